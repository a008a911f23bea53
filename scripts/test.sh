#!/usr/bin/env bash
# Installs everything into .venv and runs the whole test suite with the linters.
# PostgreSQL tests run when KMS_TEST_DATABASE_URL is set, for example
#   KMS_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres ./scripts/test.sh
# and are skipped (pytest's summary lists them) when it is not.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-venv.sh dev,bench

if [ -n "${KMS_TEST_DATABASE_URL:-}" ]; then
  echo "PostgreSQL tests: on (${KMS_TEST_DATABASE_URL%%@*}@...)"
else
  echo "PostgreSQL tests: SKIPPED (set KMS_TEST_DATABASE_URL to run them)"
fi

if command -v softhsm2-util >/dev/null; then
  echo "PKCS#11 tests: on (SoftHSM2)"
else
  echo "PKCS#11 tests: SKIPPED (install SoftHSM2: apt-get install softhsm2)"
fi

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== buf lint"
.venv/bin/buf lint
echo "== pytest"
.venv/bin/python -m pytest "$@"
