# make setup: the virtual environment in .venv (CPU PyTorch unless a CUDA one is already there)
# make test:  the test suite (CPU, a few minutes)
# make bench: speed benchmarks (print figures)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned resolve would pull the CUDA build and several GB of packages
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/elastic_overhead.py
