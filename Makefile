# Two commands for a newcomer: `make test` (creates .venv if missing, runs every test and
# notebook on CPU) and `make smoke` (the smoke study: CPU, no network, no ../shared).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: test smoke env clean-env fa3 fa3-dpsum-cpu test-torch211 device-carry

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

# lmcore's FA3 for the speed job (FA3_DPSUM + the 128 x 128 causal forward tile) built on a machine without a GPU
# (nvcc 13 and 2 cores: about 3 minutes), against torch 2.11 in a venv of its own outside the checkout (4.6 GB);
# the wheel lands in .fa3/dpsum, where fa3_rowsum_check.sh takes it instead of building on the device (README).
TORCH_BUILD_VENV ?= /tmp/lmcore-torch211
$(TORCH_BUILD_VENV)/bin/python:
	$(PY) -m venv $(TORCH_BUILD_VENV)
	$(TORCH_BUILD_VENV)/bin/pip install -q torch==2.11.0 setuptools wheel packaging ninja

fa3-dpsum-cpu: $(TORCH_BUILD_VENV)/bin/python
	PYTHON=$(TORCH_BUILD_VENV)/bin/python FA3_DPSUM=1 FA3_FWD64_CAUSAL_TILE=128x128 MAX_JOBS=$$(nproc) \
	  bash scripts/build_fa3.sh .fa3/dpsum

# The ignored folders a device job carries (.whl .data .ref .fa3; scripts/device_carry.sh says what each holds), made
# from ../shared and a fetched mirror of the original's repository (MIRROR=its git directory). Not part of test.
device-carry:
	bash scripts/device_carry.sh

# The CPU test suite under torch 2.11, the GPU machines' version (CI runs 2.13): in fa3-dpsum-cpu's venv, lmcore
# installed there editable. Session 39: a dynamo bug of 2.11 (compiled gradients of an autograd.Function) that 2.13
# does not have. Not part of test.
test-torch211: $(TORCH_BUILD_VENV)/bin/python
	$(TORCH_BUILD_VENV)/bin/pip install -q -e ".[dev]"
	$(TORCH_BUILD_VENV)/bin/python -m pytest -q -p no:cacheprovider tests

clean-env:
	rm -rf $(VENV)
