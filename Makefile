# Set-up installs torch 2.13.0 (CPU build on disk) first so pip never pulls CUDA wheels, then the project.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all bench lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,serve,bench]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m zamba2.demo

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ""

bench: setup
	$(PY) -m zamba2.bench --arch 1.2b --dtype bf16 --compare --compile --load

lint: setup
	$(VENV)/bin/ruff check zamba2 tests

clean:
	rm -rf $(VENV) .pytest_cache
