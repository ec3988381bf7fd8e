# The two commands of the README's quick start:
#   make repro   install into .venv and run the default pipeline (`dvc repro`)
#   make test    install into .venv (with test extras) and run the test suite
PYTHON ?= python3.11
VENV ?= .venv
# The CPU build of torch; override for a GPU machine, e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install install-test repro test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"

repro: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

test: install-test
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/deptry karma
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
