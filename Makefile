# One venv, two jobs: `make serve [MODEL=...]` (the built-in demo model by default) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
MODEL ?= demo

.PHONY: setup test lint browser serve chat bench demo-model

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

lint: setup
	$(BIN)/ruff check .

# In CI (CI=true), install the Chromium the playground tests drive; elsewhere they skip without it.
browser:
	@if [ -n "$$CI" ] && [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq chromium >/dev/null; fi

test: lint browser
	$(BIN)/python -m pytest -q

serve: setup
	$(BIN)/llamaforge serve --model $(MODEL)

chat: setup
	$(BIN)/llamaforge chat --model $(MODEL)

# Rebuild the built-in demo model with its recipe (about 28 minutes on 2 CPU cores) and install it.
demo-model: setup
	$(BIN)/python recipes/demo/run.py --out build/demo --install

bench: setup
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/load_memory.py
	$(BIN)/python benchmarks/finetune.py
	$(BIN)/python benchmarks/eval.py
