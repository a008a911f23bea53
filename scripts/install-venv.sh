#!/usr/bin/env bash
# Creates .venv if needed and installs the project into it (editable).
# Usage: scripts/install-venv.sh [EXTRAS], e.g. "dev" for the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
target="."
[ -n "${1:-}" ] && target=".[$1]"
[ -x .venv/bin/python ] || python3 -m venv .venv
# pip's own chatter goes to a log, shown only when the install fails.
mkdir -p build
if ! { .venv/bin/python -m pip install --quiet --upgrade pip &&
  .venv/bin/python -m pip install --quiet -e "$target"; } >build/pip.log 2>&1; then
  cat build/pip.log
  echo "installing the project failed (log above)" >&2
  exit 1
fi
