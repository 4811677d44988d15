# One venv, two jobs: `make chat MODEL=...` and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
MODEL ?= meta-llama/Llama-2-7b-chat-hf

.PHONY: setup test lint chat bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

chat: setup
	$(BIN)/llamaforge chat --model $(MODEL)

bench: setup
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/load_memory.py
