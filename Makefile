# The two commands of the README: `make run` and `make test`.
# Both create .venv on first use (Python 3.11) and reinstall only when pyproject.toml changes.
# requirements-lock.txt is resolved for Python 3.11: the first python3.11 on PATH, else python3
# (checked below: another version stops with a message instead of a half-working venv).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || echo python3)
NEED_PYTHON := 3.11
# No usage telemetry from kedro-telemetry (the project also ships a `.telemetry` opt-out file).
export KEDRO_DISABLE_TELEMETRY := true
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint viz bench clean-data lock

# The tested set first (requirements-lock.txt, nothing resolved), then the project itself.
$(STAMP): pyproject.toml requirements-lock.txt
	@test -x $(BIN)/python || $(PYTHON) -c 'import sys; sys.exit(0 if "%d.%d" % sys.version_info[:2] == "$(NEED_PYTHON)" else 1)' \
	  || { echo "make: $(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '(not found)'); the lock (requirements-lock.txt) is for Python $(NEED_PYTHON). Install Python $(NEED_PYTHON), or run: make PYTHON=/path/to/python$(NEED_PYTHON)" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; sys.exit(0 if "%d.%d" % sys.version_info[:2] == "$(NEED_PYTHON)" else 1)' \
	  || { echo "make: $(VENV) was made with Python $$($(BIN)/python -c 'import platform; print(platform.python_version())'), the lock is for $(NEED_PYTHON): delete $(VENV) and run make again" >&2; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-lock.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

## Set up (first time) and run the whole default pipeline on the embedded phantom dataset (CPU).
run: $(STAMP)
	$(BIN)/kedro run

## Set up (first time) and run the whole test suite (installs Chromium for the kedro-viz test when root).
# Two pytest-xdist workers, one test file each at a time (module fixtures stay shared):
# the suite is mostly single-threaded subprocesses, so 2 workers use both cores of a CI machine.
# --durations=30: the 30 slowest tests close the log (where to look when the suite grows).
TEST_WORKERS ?= 2
test: $(STAMP)
	@bash scripts/ensure_chromium.sh
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=30

lint: $(STAMP)
	$(BIN)/ruff check src tests bench notebooks scripts
	$(BIN)/ruff format --check src tests bench notebooks scripts

viz: $(STAMP)
	$(BIN)/kedro viz run

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

## Delete one environment's derived data (data/<ENV>: cache, models, reports...; never the raw
## download, never through a link): make clean-data [ENV=base|nih] [YES=1]
ENV ?= base
clean-data:
	$(BIN)/python -m rare_cxr.clean_data --env $(ENV) $(if $(YES),--yes)

## Re-resolve requirements-lock.txt from pyproject.toml (newest versions it allows), then
## `make test` installs and tests that set. Linux x86_64, Python 3.11 (CI's and the Dockerfile's).
LOCK_OUT ?= requirements-lock.txt
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --index-url https://pypi.org/simple \
	  --annotation-style line --custom-compile-command "make lock" -o $(LOCK_OUT)
