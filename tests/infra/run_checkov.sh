#!/usr/bin/env bash
# Static security scan of infra/ with checkov, in its own virtualenv (.venv-checkov) because
# checkov pins an old `packaging` that breaks pytest in the main venv.
#
#   tests/infra/run_checkov.sh            # from anywhere; exits non-zero on any failed check
#
# Skips come only from infra/.checkov.yaml; each has its reason in infra/README.md.
set -euo pipefail

CHECKOV_VERSION="3.3.30"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${CHECKOV_VENV:-$ROOT/.venv-checkov}"
PYTHON="${PYTHON:-python3}"

cd "$ROOT"

if [ ! -x "$VENV/bin/checkov" ] || [ "$("$VENV/bin/checkov" --version 2>/dev/null)" != "$CHECKOV_VERSION" ]; then
  echo "run_checkov: installing checkov==$CHECKOV_VERSION into $VENV" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
fi

set +e
OUT="$("$VENV/bin/checkov" --config-file infra/.checkov.yaml -d infra --framework bicep \
  --skip-download --compact --quiet 2>&1)"
RC=$?
set -e
printf '%s\n' "$OUT"

if [ "$RC" -ne 0 ]; then
  echo "run_checkov: FAILED (checkov exit code $RC)" >&2
  exit "$RC"
fi
# checkov exits 0 when it could not parse a template (it then scans nothing): insist that it
# really evaluated the templates and that nothing failed.
PASSED="$(printf '%s\n' "$OUT" | sed -n 's/.*Passed checks: \([0-9]*\).*/\1/p' | head -n1)"
FAILED="$(printf '%s\n' "$OUT" | sed -n 's/.*Failed checks: \([0-9]*\).*/\1/p' | head -n1)"
if [ -z "$PASSED" ] || [ "$PASSED" -lt 20 ]; then
  echo "run_checkov: FAILED (checkov evaluated ${PASSED:-no} checks; did a template fail to parse?)" >&2
  exit 1
fi
if [ "${FAILED:-0}" -ne 0 ]; then
  echo "run_checkov: FAILED ($FAILED failed checks)" >&2
  exit 1
fi
if printf '%s\n' "$OUT" | grep -qiE "Parsing errors: [1-9]|Failed to parse|ParseError|Unexpected token"; then
  echo "run_checkov: FAILED (a template did not parse)" >&2
  exit 1
fi
echo "run_checkov: OK ($PASSED checks passed, 0 failed)"
