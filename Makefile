# Set-up installs torch 2.13.0 (CPU build on disk) first so pip never pulls CUDA wheels, then the project.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all bench lint clean default-model draft-model

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

# The shipped default model (zamba2/models/shakespeare): fetch + split the corpus, train with `zamba2 train`
# (resumable: run it again after an interruption), then export bf16 weights and the model card.
DM := build/default-model
# The recipe both shipped models are trained with; only the config (and the output folder) differ.
RECIPE := --tokenizer $(DM)/tokenizer --data $(DM)/train --eval-data $(DM)/heldout --resume \
  --seq-len 512 --batch-size 8 --lr 2e-3 --warmup 40 --weight-decay 0.1 --steps 800 \
  --eval-every 100 --eval-batches 8 --save-every 20 --dtype bf16-autocast --seed 0 --threads 1
default-model: setup
	$(PY) recipes/default_model/prepare.py $(DM)
	$(PY) -m zamba2 train --config recipes/default_model/config.json --out $(DM)/run $(RECIPE)
	$(PY) recipes/default_model/finish.py $(DM)

# The draft model for speculative decoding (zamba2/models/shakespeare-draft): 3 layers, the same data and tokenizer.
DRAFT := build/draft-model
draft-model: setup
	$(PY) recipes/default_model/prepare.py $(DM)
	$(PY) -m zamba2 train --config recipes/default_model/draft.json --out $(DRAFT)/run $(RECIPE)
	$(PY) recipes/default_model/draft.py $(DRAFT)
