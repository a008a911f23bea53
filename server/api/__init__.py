"""The gRPC edge: translates between kms.v1 messages and the service layer."""
