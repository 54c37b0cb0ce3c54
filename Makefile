# Entry points: `make train` (main job), `make test`, `make benchmark`. Each creates the virtual
# environment and installs the pinned requirements on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/lift.py
# Python runs on tcmalloc where it is installed: XLA:CPU allocates every step's temporaries afresh
# (1.15 GB for the default training step) and glibc hands such blocks back to the kernel on free,
# so each step page-faults and zeroes them again; tcmalloc keeps them for reuse
# (docs/performance.md). Looked up when a recipe runs, after install_system_deps.sh.
TCMALLOC = $(shell PATH="$$PATH:/sbin:/usr/sbin" ldconfig -p | \
  awk '/libtcmalloc_minimal\.so\.4 /{print $$NF; exit}')
RUN = $(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC)) $(PY)

# pytest-xdist: a worker per core, at most 4 (each loads JAX, TensorFlow, PyTorch and MuJoCo),
# whole files per worker (test_launch.py's tests share one training run). ARGS="-n 0": serial.
PYTEST = $(RUN) -m pytest -q -n auto --maxprocesses=4 --dist loadfile

.PHONY: train test benchmark

$(VENV)/.installed: requirements.txt
	bash scripts/install_system_deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

train: $(VENV)/.installed
	$(RUN) launch.py --config $(CONFIG) $(ARGS)

# tests/rendering runs in its own process: MuJoCo rendering crashes next to TensorFlow.
# TESTS="tests/test_launch.py tests/test_x.py::test_y" runs those alone instead, in one pytest
# run (ARGS still adds flags); name tests/rendering in a run of its own, for the same reason.
test: $(VENV)/.installed-test
ifeq ($(strip $(TESTS)),)
	$(PYTEST) tests/rendering $(ARGS)
	$(PYTEST) tests --ignore=tests/rendering $(ARGS)
else
	$(PYTEST) $(TESTS) $(ARGS)
endif

# The torch_reference figure needs requirements-test.txt.
benchmark: $(VENV)/.installed-test
	$(RUN) scripts/benchmark.py $(ARGS)
