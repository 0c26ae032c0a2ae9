# `make run` runs the showcase sweep (teacher once, then a distill x prune x quant grid and
# its ablation table) on the embedded digits dataset; `make test` runs the test suite.
# Both create .venv and install the project on first use; the stamp file makes
# later calls skip the install until pyproject.toml changes. `make test` runs the tests on
# PYTEST_WORKERS pytest-xdist workers (2: CI's 2 cores; 0 runs them in this process), a test
# file per worker at a time (pyproject's `--dist loadfile`: the SLURM tests share one cluster).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2
export WANDB_MODE ?= offline

.PHONY: run test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/compresslab -m experiment=showcase $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs/runs outputs/multiruns outputs/teachers
