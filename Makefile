# Every target bootstraps .venv itself: on a fresh machine with Python 3.11 and pip,
# `make train` and `make test` are all the set-up there is.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: train test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

train: $(VENV)/.installed
	$(BIN)/flaxllm train --config=configs/default.py --workdir=runs/default $(ARGS)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest tests $(ARGS)

# CPU benchmarks (results go to bench/results/); on a GPU run bench/gpu_check.sh, and
# bench/aot_memory.py where libtpu is installed.
bench: $(VENV)/.installed-dev
	$(BIN)/python bench/model_speed.py $(ARGS)
	$(BIN)/python bench/train_speed.py $(ARGS)
	$(BIN)/python bench/attention.py --cpu
	$(BIN)/python bench/train_profile.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check flaxllm tests bench configs launch

clean:
	rm -rf $(VENV) build *.egg-info
