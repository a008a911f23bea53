#!/usr/bin/env bash
# The main job, for a newcomer: install, start kms-server in dev mode on the
# embedded SQLite default, register and activate a key, back up a sample
# directory, rotate, back up again, restore both backups and compare them,
# then show and verify the audit log. Stops the server it started.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

bash scripts/install-venv.sh
export PATH="$ROOT/.venv/bin:$PATH"

WORK="$ROOT/demo-data"
rm -rf "$WORK"
mkdir -p "$WORK"
step() { printf '\n== %s\n' "$*"; }

step "Start kms-server in dev mode (SQLite in $WORK/kms)"
kms-server --dev --data-dir "$WORK/kms" --listen 127.0.0.1:0 --ready-file "$WORK/ready" \
  >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
stop_server() {
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" || true
  fi
}
trap stop_server EXIT
for _ in $(seq 1 100); do
  [ -s "$WORK/ready" ] && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log"; exit 1; }
  sleep 0.1
done
[ -s "$WORK/ready" ] || { echo "the server did not start"; cat "$WORK/server.log"; exit 1; }
export KMS_ADDR
KMS_ADDR=$(cat "$WORK/ready")
grep '^dev mode\|listening' "$WORK/server.log"
TOKENS="$WORK/kms/tokens"
as() { local role=$1; shift; KMS_TOKEN_FILE="$TOKENS/$role" "$@"; }

step "Register key 'demo' and activate its first version (admin)"
as admin kmsctl register demo --activate

step "Make a sample directory"
mkdir -p "$WORK/sample/docs"
echo "quarterly numbers" >"$WORK/sample/docs/report.txt"
head -c 3000000 /dev/urandom >"$WORK/sample/data.bin"
ln -s docs/report.txt "$WORK/sample/latest"
chmod 640 "$WORK/sample/docs/report.txt"

step "Back up the sample (backup role): encrypted under version 1"
as backup kms-backup create --key demo "$WORK/sample" -o "$WORK/backup-1.kms"

step "Register version 2 and rotate to it (admin); backup 1 is not touched"
as admin kmsctl register demo
as admin kmsctl rotate demo 2 --expect 1 --reason "scheduled rotation"
as admin kmsctl versions demo

step "Change the sample and back it up again: encrypted under version 2"
echo "revised numbers" >>"$WORK/sample/docs/report.txt"
as backup kms-backup create --key demo "$WORK/sample" -o "$WORK/backup-2.kms"

step "Restore both backups (restore role): each with its own key version"
as restore kms-restore "$WORK/backup-1.kms" -o "$WORK/restored-1"
as restore kms-restore "$WORK/backup-2.kms" -o "$WORK/restored-2"
diff -r --no-dereference "$WORK/sample" "$WORK/restored-2" && echo "backup 2 matches the sample"
if diff -q "$WORK/sample/docs/report.txt" "$WORK/restored-1/docs/report.txt" >/dev/null; then
  echo "unexpected: backup 1 already had the revised report" >&2
  exit 1
fi
cmp "$WORK/sample/data.bin" "$WORK/restored-1/data.bin" && echo "backup 1 holds the original report and identical data"

step "The audit log (auditor role) and its hash chain"
as auditor kmsctl audit list
as auditor kmsctl audit verify

step "An export signed by the server, verified offline (no server, no database)"
as auditor kmsctl audit public-key >"$WORK/audit-signing.pem"
as auditor kmsctl audit export -o "$WORK/audit.jsonl"
kmsctl audit verify-export "$WORK/audit.jsonl" --public-key "$WORK/audit-signing.pem"

step "Done: the server stops now. Everything is under $WORK"
