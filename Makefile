# lmkern's entry points. Each target that runs code first makes the virtual environment
# .venv and installs lmkern into it (with torch $(TORCH)), rebuilding the extension when
# its sources change.
#
#   make demo        the main job: train a tokenizer and a small GPT on this Python's own
#                    docs with the fused kernels, then sample from it (lmkern demo)
#   make kernel-check  the fused cross-entropy on every backend here, checked against torch
#                    and timed (lmkern check)
#   make test        the test suite (CI runs this)
#   make bench       the benchmark suite; results in benchmarks/results/<device>/
#   make bench-quick its small sizes, and its pytest-benchmark form run once (CI runs this)
#   make cuda-check  compile-check the CUDA sources with nvcc (no GPU needed)
#   make triton-check  compile every Triton kernel in every config it can pick for sm_90 and
#                    sm_80 (no GPU needed), with the default triton and with the GPU
#                    machine's ($(TRITON_GPU_VERSION)); tables in $(TRITON_CHECK_OUT)
#   make info        what lmkern sees: versions, devices, backends
#   make gpu-check PART=1|2 OUT=DIR   on a GPU machine, with its own torch (no .venv): the
#                    GPU check's first or second command (scripts/gpu_check.sh); DIR gets
#                    an archive and a one-screen summary
#   make gpu-check-cpu  both GPU-check commands on CPU at tiny sizes (CI runs this)

PYTHON ?= python3
# pytest-xdist processes of make test
TEST_WORKERS ?= 2
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)

.PHONY: install demo kernel-check test bench bench-quick cuda-check triton-check info gpu-check gpu-check-cpu

$(INSTALLED): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=64" wheel ninja
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,bench]"
	touch $(INSTALLED)

install: $(INSTALLED)

demo: $(INSTALLED)
	$(PY) -m lmkern demo

kernel-check: $(INSTALLED)
	$(PY) -m lmkern check

# LMKERN_REQUIRE_BACKENDS turns "cannot run here" skips of these backends into failures,
# so that a broken build cannot pass as a skipped test.
test: $(INSTALLED)
	LMKERN_REQUIRE_BACKENDS=native,triton $(PY) -m pytest -q -n $(TEST_WORKERS) tests

bench: $(INSTALLED)
	$(PY) -m benchmarks.run

bench-quick: $(INSTALLED)
	$(PY) -m benchmarks.run --quick
	$(PY) -m pytest benchmarks --quick --benchmark-disable -q -p no:cacheprovider

cuda-check: $(INSTALLED)
	$(PY) scripts/check_cuda.py

# The GPU machine's triton, installed beside the default one (not into .venv).
TRITON_GPU_VERSION ?= 3.6.0
TRITON_GPU := build/triton-$(TRITON_GPU_VERSION)
TRITON_CHECK_OUT ?= benchmarks/results/triton-check

$(TRITON_GPU)/.installed:
	$(PY) -m pip install --quiet --no-deps --target $(TRITON_GPU) "triton==$(TRITON_GPU_VERSION)"
	touch $@

# Both versions run, and the target fails if either found a problem.
triton-check: $(INSTALLED) $(TRITON_GPU)/.installed
	status=0; \
	$(PY) scripts/triton_check.py --out $(TRITON_CHECK_OUT) || status=1; \
	PYTHONPATH=$(TRITON_GPU) $(PY) scripts/triton_check.py --out $(TRITON_CHECK_OUT) || status=1; \
	exit $$status

info: $(INSTALLED)
	$(PY) -m lmkern.info

PART ?= 1
OUT ?= build/gpu-check
gpu-check:
	scripts/gpu_check.sh $(PART) $(OUT)

gpu-check-cpu: $(INSTALLED)
	status=0; \
	PYTHON=$(abspath $(PY)) scripts/gpu_check.sh 1 build/gpu-check-cpu --cpu || status=1; \
	PYTHON=$(abspath $(PY)) scripts/gpu_check.sh 2 build/gpu-check-cpu --cpu || status=1; \
	exit $$status
