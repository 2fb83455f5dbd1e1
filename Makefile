# make demo  - the whole workflow on the embedded data set (installs what it needs into .venv first)
# make test  - the test suite (installs the test dependencies into .venv first)
# make install-gpu - CUDA JAX with a matching jax-triton and triton (Linux x86_64, CUDA GPU)
# make install-tpu - JAX with the libtpu that matches it (run on every worker of a TPU VM slice)
# make gpu-plan - XLA's plan of the training and inference steps for an H100 (memory, kernels, bytes
#                moved), without a GPU
# make tpu-plan - XLA's plan of the TPU config's training and evaluation steps for TPU slices
#                (memory per chip, FLOPs, bytes, collectives), without a TPU
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --constraint constraints.txt
PYTEST_ARGS ?=
# the tests in parallel processes, one per core up to 4 (XDIST= runs them in this process)
XDIST ?= -n auto --maxprocesses 4 --dist worksteal
DEMO_ARGS ?=
PLAN_ARGS ?=

.PHONY: install install-test install-gpu install-tpu test demo gpu-plan tpu-plan clean

install: $(VENV)/.sttn-demo
install-test: $(VENV)/.sttn-test

# The Pythons every package pinned in constraints.txt has wheels for: TensorFlow 2.21 has none for
# 3.14 (checked against the package registry on 2026-12-05), JAX 0.10 needs 3.11.
SUPPORTED_PYTHONS = 3.11 3.12 3.13

$(VENV)/.sttn-demo: pyproject.toml constraints.txt
	@test -x $(PY) || { v=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])') && \
	  case " $(SUPPORTED_PYTHONS) " in *" $$v "*) ;; *) echo "error: $(PYTHON) is Python $$v;" \
	    "the versions constraints.txt pins install on Python $(SUPPORTED_PYTHONS) only: install" \
	    "one and run make $(or $(MAKECMDGOALS),install)" \
	    "PYTHON=python$(lastword $(SUPPORTED_PYTHONS))" >&2; exit 2;; esac && \
	  $(PYTHON) -m venv $(VENV); }
	@echo "installing sttn-jax and what it runs on into $(VENV) (2.6 GB; pip is quiet meanwhile:" \
	  "about a minute from pip's cache, longer while it downloads)"
	$(PY) -m pip install --quiet --upgrade pip
	$(PIP) -e .
	@touch $@

# jax-triton (the version the GPU check runs with), JAX's CUDA plugin and its PJRT plugin (the GPU
# compiler) matching the installed jaxlib, apart from the test environment in $(VENV)/cuda-lowering:
# tests lower and compile the Triton backend and the model for CUDA through them, no GPU needed
# (tests/cuda_lowering.py, benchmarks/gpu_plan.py). Linux x86_64 only.
JAXLIB_VERSION = $$($(PY) -c 'import jaxlib; print(jaxlib.__version__)')
LOWERING_PACKAGES = "jax-cuda13-plugin==$(JAXLIB_VERSION)" "jax-cuda13-pjrt==$(JAXLIB_VERSION)" \
	jax-triton==0.3.1

# libtpu (the TPU compiler; the version the pinned jax asks for is pinned in constraints.txt) apart
# from the test environment in $(VENV)/tpu-compile: tests/test_tpu.py and benchmarks/tpu_plan.py
# compile for TPU slices through it, no TPU needed. Linux x86_64 only.
TPU_COMPILE = $(VENV)/tpu-compile

$(VENV)/.sttn-test: $(VENV)/.sttn-demo
	@echo "installing the test dependencies into $(VENV) (PyTorch, Triton, JAX's CUDA plugins," \
	  "libtpu: about 2.7 GB more; about a minute from pip's cache, longer while it downloads)"
	$(PIP) -e ".[torch,dev]"
	@if [ "$$(uname -sm)" = "Linux x86_64" ]; then \
	  $(PY) -m pip install --quiet --no-deps --upgrade --target $(VENV)/cuda-lowering \
	    $(LOWERING_PACKAGES) || echo "warning: no $(VENV)/cuda-lowering: the CUDA lowering test" \
	      "will skip (fail under CI)"; \
	  $(PIP) --no-deps --upgrade --target $(TPU_COMPILE) libtpu || echo "warning: no" \
	    "$(TPU_COMPILE): the TPU compile test will skip (fail under CI)"; fi
	@touch $@

install-gpu: $(VENV)/.sttn-demo
	$(PY) -m pip install --quiet -e ".[gpu]"

install-tpu: $(VENV)/.sttn-demo
	$(PIP) -e ".[tpu]"

test: $(VENV)/.sttn-test
	$(PY) -m pytest -q --durations=12 $(XDIST) $(PYTEST_ARGS)

# XLA's memory plan of the benchmark's steps for an H100, compiled here without a GPU
gpu-plan: $(VENV)/.sttn-test
	PYTHONPATH=$(VENV)/cuda-lowering JAX_PLATFORMS=cpu $(PY) benchmarks/gpu_plan.py $(PLAN_ARGS)

# XLA's plan of the TPU config's steps for TPU slices (v5e:2x2, v5e:4x4; PLAN_ARGS="--topology
# v5p:2x2x2" for another), compiled here without a TPU; JSON into benchmarks/results
tpu-plan: $(VENV)/.sttn-test
	PYTHONPATH=$(TPU_COMPILE) JAX_PLATFORMS=cpu $(PY) benchmarks/tpu_plan.py $(PLAN_ARGS)

demo: $(VENV)/.sttn-demo
	$(PY) -m sttn_jax.demo --workdir runs/demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
