# Two commands for a newcomer: `make test` (creates .venv if missing, runs every test and
# notebook on CPU) and `make smoke` (the smoke study: CPU, no network, no ../shared).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: test smoke env clean-env

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

clean-env:
	rm -rf $(VENV)
