# keyless: two commands for a newcomer.
#   make run    set up a Python 3.12 venv and run keyless on its defaults
#   make test   set up everything the tests need (venv, Azurite from npm) and run them
# Other targets: make lint, make unit, make e2e.

VENV   := .venv
BIN    := $(VENV)/bin
# Python 3.12: a python3.12 on PATH (pyenv's shim honours .python-version), else pyenv's 3.12.1.
PYTHON ?= $(shell python3.12 -c 'import sys' >/dev/null 2>&1 && echo python3.12 \
            || echo "$$(pyenv prefix 3.12.1 2>/dev/null)/bin/python3")

.PHONY: run test lint unit e2e deploy fuzz bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(BIN)/pip install -q -e '.[test]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

run: $(VENV)/.runtime
	$(BIN)/keyless run $(ARGS)

lint: $(VENV)/.test
	$(BIN)/ruff check .

unit: $(VENV)/.test
	$(BIN)/python -m pytest tests/unit

e2e: $(VENV)/.test node_modules/.installed
	$(BIN)/python -m pytest tests/e2e

deploy: $(VENV)/.test node_modules/.installed
	$(BIN)/python -m pytest tests/deploy

test: $(VENV)/.test node_modules/.installed lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) node_modules

bench: $(VENV)/.test node_modules/.installed
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.run --out docs --profile /tmp/keyless-profile.json

fuzz: $(VENV)/.test
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/unit/test_fuzz_parsers.py tests/unit/test_strippers.py tests/unit/test_storage_conversion.py -q
