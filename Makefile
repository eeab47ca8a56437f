# sslvision: the two commands of the README, and what they need.
#   make demo   set up everything, build the Fashion-MNIST demo scenario, run the pipeline, report
#   make test   set up everything and run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sslvision-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO := data/demo

# dvc.yaml's stage commands call `python`: the venv's, whether or not it is activated.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install demo test bench lint clean-data

# Installs only what is missing: an existing venv is reused and pip leaves a satisfying torch alone.
$(STAMP): pyproject.toml
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo ">> installing dataset-fashion-mnist"; \
	    (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)); \
	  else echo ">> Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; fi; \
	fi
	@# tests/test_report.py renders the HTML report in headless Chromium (driven by Playwright)
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo ">> installing chromium"; \
	    (apt-get install -y -qq chromium || (apt-get update -qq && apt-get install -y -qq chromium)); \
	  else echo ">> chromium is missing (tests/test_report.py skips): run 'sudo apt-get install chromium'"; fi; \
	fi
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@# Prefect's ephemeral server migrates its SQLite database on first start; doing it once here
	@# avoids first-run timeouts ("database is locked") on small machines.
	$(BIN)/prefect server database upgrade -y >/dev/null
	@touch $(STAMP)

install: $(STAMP)

# The pipeline runs as the Prefect `train` flow (ephemeral Prefect: a task per DVC stage, progress per
# stage, one MLflow parent run); then the HTML report and the summary with the wall time.
demo: install
	@start=$$(date +%s); set -e; \
	[ -f $(DEMO)/scenario.json ] || $(BIN)/sslvision demo-data --out $(DEMO); \
	mkdir -p data/pool; \
	$(BIN)/sslvision run --no-summary; \
	$(BIN)/sslvision report; \
	$(BIN)/sslvision summary; \
	echo "make demo: $$(( $$(date +%s) - start )) s wall time after install"

test: install
	$(BIN)/python -m pytest -q -x --durations=15

# Every benchmark and one comparison table (benchmarks/results/summary.json); the peers are an extra.
bench: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/run_all.py

lint: install
	$(BIN)/ruff check src stages pipelines tests benchmarks

clean-data:
	rm -rf data models reports mlflow.db mlartifacts dvclive
