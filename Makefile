# Two commands do everything on a fresh machine with Python 3.11:
#   make run    create the virtual environment if missing, install, run the pipeline on the demo
#   make test   same set-up, then the whole test suite (unit and end-to-end)
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/demo.yaml
PYTEST_ARGS ?=

export PREFECT_LOGGING_EXTRA_LOGGERS ?= tasks,models,config,flows
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PYTHONPATH := $(CURDIR)

.PHONY: run test venv lint clean bench evaluate stack-up stack-down

# Reinstall when either requirements file changes.
$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	@touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m flows.train_all_fusions --config $(CONFIG)

# Re-evaluate a finished run from the bucket alone (RUN=<id>; default: the newest run).
evaluate: $(STAMP)
	$(BIN)/python -m flows.evaluate --config $(CONFIG) $(if $(RUN),--run $(RUN),)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Local production-like stack (scripts/stack.py): Prefect server + UI on 127.0.0.1:4200, a process
# worker, SeaweedFS S3 on 127.0.0.1:8333 with the generated benchmark, every deployment of
# prefect.yaml. Ports and more: make stack-up STACK_ARGS="--prefect-port 4300 --workers 2".
STACK_DIR ?= .stack
STACK_ARGS ?=
stack-up: $(STAMP)
	$(BIN)/python -m scripts.stack up --dir $(STACK_DIR) $(STACK_ARGS)

stack-down:
	$(BIN)/python -m scripts.stack down --dir $(STACK_DIR)

# Preprocessing throughput ratios (concurrent vs sequential fetch, cache hit vs miss).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_preprocess

lint: $(STAMP)
	$(BIN)/ruff format --check . && $(BIN)/ruff check . && $(BIN)/mypy tasks config models

clean:
	rm -rf bucket .pytest_cache
