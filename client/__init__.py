"""The client programs (kmsctl, kms-backup, kms-restore) and the client library they share."""

import os

# gRPC's C core writes its own log lines (a failed TLS handshake, say) to stderr; the programs
# already say what failed in one line. Read when grpc starts, so it is set before any import.
# An operator who wants them sets GRPC_VERBOSITY themselves.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
