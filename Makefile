# Two commands for a newcomer: `make test` (creates .venv if missing, runs every test and
# notebook on CPU) and `make smoke` (the smoke study: CPU, no network, no ../shared).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: test smoke env clean-env fa3

$(VENV)/.ready: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build on local disk: a bare `torch` would pull a CUDA build
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[dev]"
	touch $@

env: $(VENV)/.ready

test: $(VENV)/.ready
	$(VPY) -m pytest -q tests
	$(VPY) -m pytest -q --nbval-lax notebooks/

smoke: $(VENV)/.ready
	$(VPY) -m lmcore study smoke

# FlashAttention-3 wheel (GPU machine with a CUDA toolkit; see README): not part of test/smoke.
FA3_OUT ?= .fa3/wheel
fa3:
	bash scripts/build_fa3.sh $(FA3_OUT)

clean-env:
	rm -rf $(VENV)
