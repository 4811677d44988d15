# One venv, two jobs: `make serve [MODEL=...]` (the built-in demo model by default) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
MODEL ?= demo

.PHONY: setup test lint browser simde serve chat bench demo-model

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

# In CI, also install SIMDe (headers only): on a CPU without AVX-512 the C kernels' AVX-512 build is tested emulated.
simde:
	@if [ -n "$$CI" ] && [ ! -d /usr/include/simde ] && command -v apt-get >/dev/null; then \
		apt-get install -y -qq libsimde-dev >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq libsimde-dev >/dev/null); fi

KERNEL_TESTS := tests/test_fused_decode.py tests/test_quantize_int.py tests/test_prefix_cache.py tests/test_model.py \
	tests/test_adapters.py

# The C kernels have two builds, AVX-512 and AVX2; the first pass tests the one this CPU runs, the second the other:
# built for AVX2 (LLAMAFORGE_KERNELS=avx2) on an AVX-512 CPU, or emulated (LLAMAFORGE_KERNELS=emulate) on one without.
test: lint browser simde
	$(BIN)/python -m pytest -q
	@if grep -q avx512_bf16 /proc/cpuinfo 2>/dev/null; then \
		echo "The kernels' tests again, their AVX2 build (LLAMAFORGE_KERNELS=avx2)"; \
		LLAMAFORGE_KERNELS=avx2 $(BIN)/python -m pytest -q $(KERNEL_TESTS); \
	elif [ -d /usr/include/simde ]; then \
		echo "This CPU lacks AVX-512: the kernels' tests again, their AVX-512 build emulated (LLAMAFORGE_KERNELS=emulate)"; \
		LLAMAFORGE_KERNELS=emulate $(BIN)/python -m pytest -q $(KERNEL_TESTS); fi

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
