# fetalbrain — common tasks. `make` lists them.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Offline and quiet: no hub downloads, no W&B uploads, no update checks.
TEST_ENV := HF_HUB_OFFLINE=1 WANDB_MODE=offline NO_ALBUMENTATIONS_UPDATE=1 GRADIO_ANALYTICS_ENABLED=False

.DEFAULT_GOAL := help
.PHONY: help install browser train test test-all sweep audit compare benchmark gui lint clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

install: ## create .venv and install the package (editable) with dev extras
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"

browser: ## install Debian's Chromium for the GUI browser test (needs root and apt; a no-op when present)
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "Chromium not installed and cannot install it here: the browser test will be skipped"; fi; }

train: ## train and test the default model on the embedded dataset (args: ARGS="model=cnn ...")
	$(PY) -m fetalbrain.train $(ARGS)

test: ## the fast test suite (offline, a few minutes on 2 cores)
	$(TEST_ENV) $(PY) -m pytest -m "not slow" -q

test-all: ## every test, the slow ones too
	$(TEST_ENV) $(PY) -m pytest -q

sweep: ## example multirun: 2 models x 2 learning rates, 3 epochs each
	$(PY) -m fetalbrain.train -m model=cnn,separable optimizer.lr=0.001,0.0003 trainer.max_epochs=3 $(ARGS)

audit: ## leakage and duplicate audit of the embedded dataset (report in outputs/audit/)
	$(PY) -m fetalbrain.audit $(ARGS)

compare: ## compare runs: make compare RUNS=outputs/multirun/<date>/<time>
	$(PY) -m fetalbrain.compare $(or $(RUNS),outputs) $(ARGS)

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
