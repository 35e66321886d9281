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
	$(BIN)/hetlm build --config configs/tiny.yaml
	$(BIN)/hetlm train --config configs/tiny.yaml
	$(BIN)/hetlm eval runs/tiny
	$(BIN)/hetlm generate runs/tiny --prompt "def main(" --max-new-tokens 80 --seed 0
	$(BIN)/hetlm deploy runs/tiny --out bundles/tiny
	@echo "data:   data/python-stdlib (tokenizer.model, train.bin, val.bin, manifest.json)"
	@echo "run:    runs/tiny (config.yaml, checkpoints/step-*/, metrics.jsonl, eval.json, loss.png, tensorboard/)"
	@echo "bundle: bundles/tiny (loads with transformers; serve it with: $(BIN)/hetlm serve bundles/tiny)"

test: setup
	$(BIN)/python -m pytest -q

# Each script prints one JSON object; bench/shakespeare.py also needs tinyshakespeare.txt (see its --help).
bench: setup
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/serve.py

lint: setup
	$(BIN)/ruff check hetlm tests bench

clean:
	rm -rf $(VENV) runs bundles data/*/
