# Every target creates/refreshes the local virtual environment first, with plain pip.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fxq-installed
# idle OpenMP threads sleep instead of spinning (shared 2-core machines; see fxq/cli.py)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test test-slow bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first, pinned to the releases that install from local disk here;
	# pyproject.toml itself only asks for torch>=2.6.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[examples,test,transformers]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fxq.examples.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) fxq-out .pytest_cache
