# make venv  — .venv with everything hetero and its tests need
# make demo  — the main job: zoo:deepseek-v3-tiny split across accel and host, checked against eager
# make test  — the test suite (CPU only; GPU tests skip without CUDA), less the `slow` tests
# make gpu-check — on a machine with CUDA and a preinstalled torch: GPU tests, demo, benchmarks -> gpu-check/
# make test-slow — the `slow` tests (zoo models through Inductor, the costliest architectures, the
#                  multi-process expert-parallel tests, bisect and a 32-layer drawing)
# make peers — llama.cpp's llama-bench and llama-quantize (from the llama-cpp-python sdist) in .peers/,
#              and the converter's Python packages, for `hetero bench e2e --peers` (~10 min; not in test)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hetero-installed
# The CPU build of torch 2.13.0 is a local file on the development and CI machines;
# machines with a preinstalled torch (the GPU hosts) can use `make venv TORCH_SPEC=`.
TORCH_SPEC ?= torch==2.13.0
# pytest-xdist workers for `make test` (one per core; each worker runs torch with one thread).
TEST_WORKERS ?= auto
# --dist loadgroup: tests marked with one xdist_group run on one worker (they share what they compute);
# --durations: the slowest tests, so that a suite growing past its 10 minutes shows where.
PYTEST_FLAGS ?= --dist loadgroup --durations=15

.PHONY: venv demo test test-slow gpu-check lint clean peers

# $(call system_package,COMMAND,DEBIAN_PACKAGE,WHAT_IS_LOST): install a Debian package when COMMAND is
# missing and this is a Debian/Ubuntu machine where we are root; otherwise say what is lost, and go on.
define system_package
	@if ! command -v $(1) >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing $(2) (Debian package) for $(1) ..."; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null) \
	      || echo "warning: installing $(2) failed; $(3)"; \
	  else \
	    echo "note: $(1) is missing and this machine cannot install $(2) here (needs apt-get and root); $(3)"; \
	  fi; \
	fi
endef

venv: $(STAMP)
	$(call system_package,dot,graphviz,graph.svg is not drawn (graph.dot still is))

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(PY) -m pip install --quiet "$(TORCH_SPEC)")
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $@

demo: venv
	$(VENV)/bin/hetero demo

test: venv
	$(call system_package,chromium,chromium,the test that renders report.html in a browser is skipped)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_FLAGS) -m "not slow"

test-slow: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_FLAGS) -m slow

# The GPU machines reach no registry: their python3 holds torch, and the script installs hetero
# into it with `pip install -e . --no-deps`. Without CUDA it lists its steps and exits 0.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py --out gpu-check

# scripts/build_peers.py skips every step whose result is there: a second `make peers` does nothing.
# It needs a venv but leaves an existing one as it is (no reinstall when pyproject.toml is newer).
# PEERS_FLAGS=--amx keeps ggml's AMX kernels (off by default: see scripts/build_peers.py).
peers:
	@test -x $(PY) || $(MAKE) venv
	$(PY) scripts/build_peers.py $(PEERS_FLAGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) hetero-dumps .pytest_cache test-artifacts gpu-check
