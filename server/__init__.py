"""The kms.v1 key-management server."""
