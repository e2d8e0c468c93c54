# The two commands of the README: `make run` and `make test`.
# Both create .venv on first use (Python 3.11) and reinstall only when pyproject.toml changes.
PYTHON ?= python3
# No usage telemetry from kedro-telemetry (the project also ships a `.telemetry` opt-out file).
export KEDRO_DISABLE_TELEMETRY := true
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint viz bench clean-data

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

## Set up (first time) and run the whole default pipeline on the embedded phantom dataset (CPU).
run: $(STAMP)
	$(BIN)/kedro run

## Set up (first time) and run the whole test suite (installs Chromium for the kedro-viz test when root).
test: $(STAMP)
	@bash scripts/ensure_chromium.sh
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

viz: $(STAMP)
	$(BIN)/kedro viz run

bench: $(STAMP)
	$(BIN)/python bench/run_all.py
