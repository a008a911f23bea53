"""The audit log's public format: chain hashes, signed checkpoints and exports.

Shared by the server, which writes them, and by the offline verifier
(`kmsctl audit verify-export`), which checks them with no server and no database.
It imports only the standard library and `cryptography`, never `server`, so an
auditor can read and run it on its own.
"""
