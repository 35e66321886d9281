# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv first.
# TORCH picks the torch build: the default is the CPU wheel; on a CUDA machine use e.g.
#   make setup TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3.11
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.hetlm-installed

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test,serve,plots,dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/hetlm preprocess

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/preprocess.py

lint: setup
	$(BIN)/ruff check hetlm tests bench

clean:
	rm -rf $(VENV) runs data/*/
