# latentdiff — the two commands: `make demo` (the embedded default) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
PYTEST_ARGS ?= -n 2 -q

.PHONY: demo demo-train test lint install install-test clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Base install: what training and sampling need (no PyTorch).
$(VENV)/.installed-base: setup.cfg pyproject.toml | $(VENV)/bin/activate
	$(PIP) install -q -e .
	touch $@

# Test install: the base plus the reference oracles (torch, diffusers, lpips, pytorch-fid).
$(VENV)/.installed-test: setup.cfg pyproject.toml | $(VENV)/bin/activate
	$(PIP) install -q -e ".[test]"
	touch $@ $(VENV)/.installed-base

install: $(VENV)/.installed-base
install-test: $(VENV)/.installed-test

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS) tests

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(VENV)/.installed-base
	$(PY) -m latentdiff.demo run --demo_dir demo --out demo_out

demo-train: $(VENV)/.installed-base
	$(PY) -m latentdiff.demo train --workdir workdirs/demo --demo_dir demo

clean:
	rm -rf demo_out .pytest_cache
