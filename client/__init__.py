"""Command-line clients of the key-management service: kmsctl, kms-backup, kms-restore."""
