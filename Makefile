# Two commands matter: `make dev` runs the connector locally, `make test` runs every check.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: dev test install lint unit infra bench chaos clean

$(STAMP): requirements.txt requirements-dev.txt package.json package-lock.json
	@command -v node >/dev/null || { echo "Node.js 18+ is required for Azurite (https://nodejs.org)."; exit 1; }
	@echo "== Creating $(VENV) and installing Python dependencies (first run only)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@echo "== Installing Azurite with npm ci (first run only)"
	@npm ci --no-audit --no-fund --loglevel=error
	@touch $(STAMP)

install: $(STAMP)

dev: $(STAMP)
	@$(PY) -m devstack up

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest -q

infra:
	bash tests/infra/run_checkov.sh

test: lint unit

bench: $(STAMP)
	$(PY) -m bench

# Load and faults together, then an audit (bench/chaos.py); options: make chaos CHAOS_ARGS="--minutes 1".
chaos: $(STAMP)
	$(PY) -m bench chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) node_modules .devstack test-artifacts .pytest_cache .mypy_cache .ruff_cache
