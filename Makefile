# fetalbrain — common tasks. `make` lists them.
VENV   ?= .venv
PY     := $(VENV)/bin/python
LOCK   := requirements.lock
# test processes (pytest-xdist; whole files per worker, so module fixtures are made once)
WORKERS ?= 2
# Offline and quiet: no hub downloads, no W&B uploads, no update checks.
TEST_ENV := HF_HUB_OFFLINE=1 WANDB_MODE=offline NO_ALBUMENTATIONS_UPDATE=1 GRADIO_ANALYTICS_ENABLED=False

.DEFAULT_GOAL := help
.PHONY: help install lock browser train test test-all sweep audit compare study benchmark gui lint clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

install: ## create .venv and install the package (editable) with dev extras, at the versions in requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip -c $(LOCK)
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[dev]"

# The machine's own pip constraints (pip config's global.constraint, PIP_CONSTRAINT) bind the lock too: it must
# name only versions this machine can install (here torch and torchvision: the wheels on its disk).
PIP_CAPS = $(strip $(PIP_CONSTRAINT) $(shell $(PY) -m pip config list 2>/dev/null | sed -n "s/^global\.constraint='\(.*\)'$$/\1/p"))

PY_ABOUT = $(shell $(PY) -c 'import platform; print("Python", platform.python_version(), "on", platform.system(), platform.machine())')

lock: ## remake requirements.lock from pyproject.toml with pip-compile (UPGRADE=1: every pin to its newest allowed)
	@test -x $(VENV)/bin/pip-compile || { echo "no $(VENV)/bin/pip-compile: run make install first"; exit 1; }
	@cp $(LOCK) $(LOCK).new 2>/dev/null || true   # pip-compile keeps the pins it finds there, unless UPGRADE=1
	$(VENV)/bin/pip-compile --quiet --no-header --extra dev --allow-unsafe --strip-extras --no-emit-index-url \
	  --no-emit-find-links $(if $(UPGRADE),--upgrade) $(addprefix -c ,$(PIP_CAPS)) -o $(LOCK).new pyproject.toml
	@{ echo "# Every package of the tested environment (fetalbrain with its dev extra), pinned. Made by \`make lock\`:"; \
	  echo "# pip-compile (pip-tools) from pyproject.toml; do not edit by hand. \`make install\` installs through it:"; \
	  echo "#   pip install -c $(LOCK) -e \".[dev]\""; \
	  echo "# Resolved with $(PY_ABOUT), under the pip constraints: $(or $(PIP_CAPS),none)."; \
	  cat $(LOCK).new; } > $(LOCK)
	@rm -f $(LOCK).new

browser: ## install Debian's Chromium for the GUI browser test (needs root and apt; a no-op when present)
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "Chromium not installed and cannot install it here: the browser test will be skipped"; fi; }

train: ## train and test the default model on the embedded dataset (args: ARGS="model=cnn ...")
	$(PY) -m fetalbrain.train $(ARGS)

test: ## the fast test suite (offline; about 5 minutes on 2 cores: one worker per core, WORKERS=1 for one process)
	$(TEST_ENV) $(PY) -m pytest -m "not slow" -q $(if $(filter-out 1,$(WORKERS)),-n $(WORKERS) --dist loadfile --no-loadscope-reorder)

test-all: ## every test, the slow ones too
	$(TEST_ENV) $(PY) -m pytest -q $(if $(filter-out 1,$(WORKERS)),-n $(WORKERS) --dist loadfile --no-loadscope-reorder)

sweep: ## example multirun: 2 models x 2 learning rates, 3 epochs each
	$(PY) -m fetalbrain.train -m model=cnn,separable optimizer.lr=0.001,0.0003 trainer.max_epochs=3 $(ARGS)

audit: ## leakage and duplicate audit of the embedded dataset (report in outputs/audit/)
	$(PY) -m fetalbrain.audit $(ARGS)

compare: ## compare runs: make compare RUNS=outputs/multirun/<date>/<time>
	$(PY) -m fetalbrain.compare $(or $(RUNS),outputs) $(ARGS)

study: ## run a declared study, then summarise it: make study NAME=reproduction [ARGS="--summarise"]
	$(PY) -m fetalbrain.study $(or $(NAME),$(error NAME=<a folder of experiments/ with a study.yaml>)) $(ARGS)

benchmark: ## speed and memory of every model and of the data pipeline (about a minute on 2 cores)
	HF_HUB_OFFLINE=1 $(PY) -m fetalbrain.benchmark $(ARGS)

gui: ## the web GUI on 127.0.0.1:7860, serving the newest run (ARGS="ckpt=... port=...")
	GRADIO_ANALYTICS_ENABLED=False $(PY) -m fetalbrain.app $(ARGS)

lint: ## ruff, and the layers' import contracts (pyproject.toml, [tool.importlinter])
	$(PY) -m ruff check fetalbrain hydra_plugins tests
	$(VENV)/bin/lint-imports

clean: ## remove caches and run outputs (keeps outputs/README.md)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache multirun lightning_logs wandb
	find outputs -mindepth 1 ! -name README.md -prune -exec rm -rf {} +
