# make venv  — .venv with everything hetero and its tests need
# make demo  — the main job: zoo:deepseek-v3-tiny split across accel and host, checked against eager
# make test  — the test suite (CPU only; GPU tests skip without CUDA)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hetero-installed
# The CPU build of torch 2.13.0 is a local file on the development and CI machines;
# machines with a preinstalled torch (the GPU hosts) can use `make venv TORCH_SPEC=`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(PY) -m pip install --quiet "$(TORCH_SPEC)")
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $@

demo: venv
	$(VENV)/bin/hetero demo

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) hetero-dumps .pytest_cache
