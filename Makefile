# lmkern's entry points. Each target that runs code first makes the virtual environment
# .venv and installs lmkern into it (with torch $(TORCH)), rebuilding the extension when
# its sources change.
#
#   make demo        the main job: train a tokenizer and a small GPT on this Python's own
#                    docs with the fused kernels, then sample from it (lmkern demo)
#   make demo-kernels  the fused cross-entropy on every backend, against torch
#   make test        the test suite (CI runs this)
#   make bench       the benchmark suite; results in benchmarks/results/<device>/
#   make bench-quick its small sizes, and its pytest-benchmark form run once (CI runs this)
#   make cuda-check  compile-check the CUDA sources with nvcc (no GPU needed)
#   make info        what lmkern sees: versions, devices, backends
#   make gpu-check OUT=DIR   on a GPU machine, with its own torch (no .venv): build with
#                    CUDA, all tests, the benchmarks; logs, results and a summary in DIR

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)

.PHONY: install demo demo-kernels test bench bench-quick cuda-check info gpu-check

$(INSTALLED): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=64" wheel ninja
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,bench]"
	touch $(INSTALLED)

install: $(INSTALLED)

demo: $(INSTALLED)
	$(PY) -m lmkern demo

demo-kernels: $(INSTALLED)
	$(PY) -m lmkern.demo

# LMKERN_REQUIRE_BACKENDS turns "cannot run here" skips of these backends into failures,
# so that a broken build cannot pass as a skipped test.
test: $(INSTALLED)
	LMKERN_REQUIRE_BACKENDS=native,triton $(PY) -m pytest -q tests

bench: $(INSTALLED)
	$(PY) -m benchmarks.run

bench-quick: $(INSTALLED)
	$(PY) -m benchmarks.run --quick
	$(PY) -m pytest benchmarks --quick --benchmark-disable -q -p no:cacheprovider

cuda-check: $(INSTALLED)
	$(PY) scripts/check_cuda.py

info: $(INSTALLED)
	$(PY) -m lmkern.info

OUT ?= build/gpu-check
gpu-check:
	scripts/gpu_check.sh $(OUT)
