# Entry points, each working on a fresh clone with nothing installed:
#   make demo   - create .venv, install, run the main job on the embedded data
#   make test   - create .venv, install with test extras, run the whole test suite
#   make lint   - ruff (lint and import order) on the Python tree, clang-format on csrc/
#   make docs   - the API reference from the docstrings (pdoc) in build/api/
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CUDA build that also brings triton; override for another platform, e.g. TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: demo test lint docs install bench clean gpu-deps

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m vpns_fast.demo

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror csrc/*.cpp csrc/*.h

docs: $(VENV)/.installed
	$(PY) docs/build_api.py build/api

bench: $(VENV)/.installed
	$(PY) -m bench all

# Test dependencies for the GPU machine's CPython 3.12, which has no package registry: carried to it
# as .gpu_deps/ by the device tool (see bench/gpu_session.sh).
gpu-deps: $(VENV)/.installed
	$(PY) -m pip install -q --upgrade --target .gpu_deps --python-version 3.12 --implementation cp \
		--only-binary=:all: --platform manylinux_2_17_x86_64 pytest pytest-benchmark hypothesis safetensors

clean:
	rm -rf build *.egg-info vpns_fast/_C*.so
