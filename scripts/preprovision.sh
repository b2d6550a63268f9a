#!/bin/sh
# azd preprovision hook (POSIX). Registers the resource providers the deployment needs but does not
# declare (Microsoft.App, for Flex Consumption). The logic lives in preprovision.py.
set -eu

DIR="$(cd "$(dirname "$0")" && pwd)"

if command -v python3 >/dev/null 2>&1; then
  PY=python3
elif command -v python >/dev/null 2>&1; then
  PY=python
else
  echo "preprovision: Python 3 is required (python3 or python on PATH)" >&2
  exit 2
fi

exec "$PY" "$DIR/preprovision.py"
