# s4mim: `make run` (embedded default pipeline) and `make test` both start by installing into .venv.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.s4mim-installed
PORT ?= 5000

.PHONY: run test test-slow install lint sweep ui bench quality clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/s4mim pipeline run shapes-1/8

test: install
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

sweep: install
	$(BIN)/s4mim sweep default

ui: install
	$(BIN)/s4mim ui --port $(PORT)

bench: install
	$(BIN)/s4mim bench --device cpu

quality: install
	$(BIN)/s4mim quality --jobs 2

clean:
	rm -rf runs
