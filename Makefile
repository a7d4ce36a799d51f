# Developer and CI entry points. Every target uses .venv/bin/ directly, so no activation is needed.
# `make up` installs and starts the whole stack; `make test` installs and runs everything CI runs.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install up check test gen fmt

install:
	@$(PYTHON) -c "import sys; sys.exit(sys.version_info < (3, 11))" || { echo "Tessera needs Python 3.11 or newer as $(PYTHON)" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'

up: install
	$(BIN)/tessera up

# The order is cheap-to-expensive; make stops at the first failing step and exits non-zero.
check:
	$(BIN)/tessera proto format
	$(BIN)/tessera proto lint
	$(BIN)/tessera proto breaking
	$(BIN)/tessera proto gen --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/tessera migrate round-trip
	$(BIN)/tessera migrate lint
	$(BIN)/pytest

test: install
	@$(MAKE) --no-print-directory check

gen:
	$(BIN)/tessera proto gen

fmt:
	$(BIN)/tessera proto format --write
	$(BIN)/ruff check --select I --fix .
	$(BIN)/ruff format .
