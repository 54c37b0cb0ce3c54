# Two entry points: `make train` (main job) and `make test`. Each creates the virtual
# environment and installs the pinned requirements on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/lift.py
export MUJOCO_GL ?= egl

.PHONY: train test system-deps

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
	$(PY) launch.py --config $(CONFIG) $(ARGS)

# tests/rendering runs in its own process: MuJoCo rendering crashes next to TensorFlow.
test: $(VENV)/.installed-test
	$(PY) -m pytest -q tests/rendering $(ARGS)
	$(PY) -m pytest -q tests --ignore=tests/rendering $(ARGS)
