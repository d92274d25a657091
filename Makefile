# lmkern's entry points. Each target that runs code first makes the virtual environment
# .venv and installs lmkern into it (with torch $(TORCH)), rebuilding the extension when
# its sources change.
#
#   make demo        the main job: fused cross-entropy on every backend, against torch
#   make test        the test suite (CI runs this)
#   make cuda-check  compile-check the CUDA sources with nvcc (no GPU needed)
#   make info        what lmkern sees: versions, devices, backends

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)

.PHONY: install demo test cuda-check info

$(INSTALLED): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=64" wheel ninja
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,bench]"
	touch $(INSTALLED)

install: $(INSTALLED)

demo: $(INSTALLED)
	$(PY) -m lmkern.demo

# LMKERN_REQUIRE_BACKENDS turns "cannot run here" skips of these backends into failures,
# so that a broken build cannot pass as a skipped test.
test: $(INSTALLED)
	LMKERN_REQUIRE_BACKENDS=native,triton $(PY) -m pytest -q tests

cuda-check: $(INSTALLED)
	$(PY) scripts/check_cuda.py

info: $(INSTALLED)
	$(PY) -m lmkern.info
