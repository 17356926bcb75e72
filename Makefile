# The venv lives in .venv; every target creates it when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/ssh-sync-trio serve

test: $(BIN)/.installed-test
	$(BIN)/python -m pytest

lint: $(BIN)/.installed-test
	$(BIN)/ruff check ssh_sync_trio tests bench
	$(BIN)/mypy ssh_sync_trio

bench: $(BIN)/.installed-test
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
