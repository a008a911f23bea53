"""Use cases of the key-management service, one module per group."""
