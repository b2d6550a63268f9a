#!/bin/sh
# Runs an azd hook's Python logic (scripts/<name>.py) with the first Python 3 on PATH (POSIX).
# Usage: run_hook.sh preprovision.py
set -eu

DIR="$(cd "$(dirname "$0")" && pwd)"

if command -v python3 >/dev/null 2>&1; then
  PY=python3
elif command -v python >/dev/null 2>&1; then
  PY=python
else
  echo "${1%.py}: Python 3 is required (python3 or python on PATH)" >&2
  exit 2
fi

exec "$PY" "$DIR/$1"
