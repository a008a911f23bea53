"""`kms-server init --data-dir DIR`: a production data directory, without dev tokens.

The directory (mode 0700) gets a new root key file (0600) and an empty policy (0600) that
says how to add principals; nothing that exists is overwritten.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from server.keystore.crypto import RootKey

POLICY_TEMPLATE = """\
# kms-server policy: who may call, and in which roles (admin, backup, restore, auditor).
# Empty: nobody may call until you add principals. For each, make a random token, give it
# to the principal, and keep only its SHA-256 here, e.g.
#
#   token=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
#   printf %s "$token" | sha256sum
#
# [principals.ops-admin]
# roles = ["admin"]
# token_sha256 = ["<the sha256sum output>"]
#
# [principals.backup-agent]          # may also connect with a client certificate (CN)
# roles = ["backup"]
#
# Send SIGHUP to the server after editing this file.
"""


class InitError(Exception):
    """The data directory cannot be made as asked."""


def init_data_dir(data_dir: Path) -> list[Path]:
    """Creates what is missing; returns the files it wrote."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if data_dir.stat().st_mode & 0o077:
        raise InitError(f"{data_dir} is open to others; run: chmod 700 {data_dir}")
    written = []
    root_key = data_dir / "root.key"
    if not root_key.exists():
        RootKey.create(root_key)
        written.append(root_key)
    policy = data_dir / "policy.toml"
    if not policy.exists():
        fd = os.open(policy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(POLICY_TEMPLATE)
        written.append(policy)
    return written


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kms-server init",
        description="Creates a production data directory: a root key file and an empty policy.",
    )
    parser.add_argument("--data-dir", required=True, type=Path, help="the directory to create")
    args = parser.parse_args(argv)
    old_umask = os.umask(0o077)
    try:
        written = init_data_dir(args.data_dir)
    except (InitError, OSError) as error:
        print(f"kms-server init: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        os.umask(old_umask)
    for path in written:
        print(f"created {path}")
    if not written:
        print(f"{args.data_dir} already holds a root key and a policy; nothing was changed")
    print(
        f"next: add principals to {args.data_dir / 'policy.toml'}, then run kms-server "
        f"--data-dir {args.data_dir} with --tls-cert and --tls-key"
    )
    return 0
