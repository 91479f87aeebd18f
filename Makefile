# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export NSFAAS_DATA_DIR ?= .nsfaas

.PHONY: run test lint typecheck pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	NSFAAS_EXAMPLES_DIR=functions $(BIN)/nsfaas serve

lint: $(VENV)/.test-installed
	$(BIN)/ruff check gateway jail tests bench

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy

pytest: $(VENV)/.test-installed
	$(BIN)/pytest

test: $(VENV)/.test-installed
	$(BIN)/ruff check gateway jail tests bench
	$(BIN)/mypy
	$(BIN)/pytest

bench: $(VENV)/.test-installed
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python bench/bench_cold.py
	$(BIN)/python bench/bench_warm.py

clean:
	rm -rf $(VENV) .nsfaas .mypy_cache .pytest_cache .ruff_cache
