#!/bin/sh
# azd postprovision hook (POSIX). Creates the token key ring and the webhook secret in Key Vault
# if they do not exist yet; never overwrites them. The logic lives in postprovision.py.
set -eu

DIR="$(cd "$(dirname "$0")" && pwd)"

if command -v python3 >/dev/null 2>&1; then
  PY=python3
elif command -v python >/dev/null 2>&1; then
  PY=python
else
  echo "postprovision: Python 3 is required (python3 or python on PATH)" >&2
  exit 2
fi

exec "$PY" "$DIR/postprovision.py"
