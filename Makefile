# Two commands on a fresh CPU machine: `make test` and `make demo`.
# The CPU build of torch is installed first and alone, so that nothing later can pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: test demo bench lint install clean

$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt setuptools wheel ninja
	# --no-build-isolation: setup.py builds against the torch just installed, not a fresh CUDA one.
	$(PIP) install -q -c constraints.txt --no-build-isolation -e ".[train,test,trl]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m apa_fast.train --output-dir runs/demo --overwrite

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info $(VENV)
