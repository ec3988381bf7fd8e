# The two commands of the README's quick start:
#   make repro   install into .venv and run the default pipeline (`dvc repro`)
#   make test    install into .venv (with test extras) and run the test suite
#   make lock    re-resolve every dependency in a scratch venv and rewrite constraints.txt
# Installs are pinned by constraints.txt (every dependency), so a fresh clone gets the versions
# that made the committed dvc.lock and `make repro` leaves `git status` clean.
PYTHON ?= python3.11
VENV ?= .venv
# The CPU build of torch; override for a GPU machine, e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=

CONSTRAINTS := -c constraints.txt
LOCK_VENV ?= .cache/lock-venv

.PHONY: install install-test repro test lint lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet $(CONSTRAINTS) -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install --quiet $(CONSTRAINTS) -e ".[test]"

lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(LOCK_VENV)/bin/python -m pip install --quiet -e ".[test]"
	{ sed -n '1,3p' constraints.txt; $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable \
	  | grep -v '^torch==' | LC_ALL=C sort -f; } > constraints.txt.new && mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

repro: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

test: install-test
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/deptry karma
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
