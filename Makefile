# The scripts CI runs are the ones a developer runs: `make test` is what .ci/run calls.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint typecheck pytest demo sandbox bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider

test: lint typecheck pytest

demo: $(STAMP)
	$(BIN)/closesync demo

sandbox: $(STAMP)
	$(BIN)/closesync sandbox

# FLEET_ARGS picks the fleet sizes and more, e.g. make bench FLEET_ARGS="--n 100,1000".
FLEET_ARGS ?=
# LATENCY_ARGS e.g. "--changes 30 --poll-changes 0" (the poll-only half takes about 8 minutes).
LATENCY_ARGS ?=
bench: $(STAMP)
	$(BIN)/python -m benchmarks.sync_cost
	$(BIN)/python -m benchmarks.fleet $(FLEET_ARGS)
	$(BIN)/python -m benchmarks.webhook_latency $(LATENCY_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
