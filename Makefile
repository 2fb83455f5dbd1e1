# make demo  - the whole workflow on the embedded data set (installs into .venv first if needed)
# make test  - the test suite (installs into .venv first if needed)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sttn-installed
# A CPU build of PyTorch; override (e.g. TORCH_SPEC='torch==2.11.0') where another is wanted.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[torch,data,dev]"
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=12 $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m sttn_jax.demo --workdir runs/demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
