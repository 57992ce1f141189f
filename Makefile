# The README's two commands: `make demo` (the main job) and `make test` (the whole suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Every data file the registry needs lies in ../shared/data beside the checkout.
export TINYGRAD_LLM_DATA ?= $(abspath $(CURDIR)/../shared/data)

.PHONY: test demo bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,distributed]'
	touch $@

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider

# One to a few minutes on two CPU cores: the tiny GPT learns The Verdict (loss curve printed, checkpoint
# and loss plot in runs/demo), then continues the book's prompt.
demo: $(VENV)/.installed
	$(BIN)/tinygrad-llm pretrain --data the-verdict --config tiny --epochs 20 --batch-size 2 --lr 2e-3 \
		--warmup 20 --cosine --min-lr 1e-4 --grad-clip 1.0 --eval-freq 40 --eval-iter 4 --out runs/demo --plot
	$(BIN)/tinygrad-llm generate --checkpoint runs/demo/checkpoint.safetensors \
		--prompt "Every effort moves you" --max-new-tokens 50

bench: $(VENV)/.installed
	for b in benchmarks/*.py; do PYTHONPATH=. $(BIN)/python $$b || exit 1; done
