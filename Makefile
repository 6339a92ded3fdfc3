# Two commands do everything on a fresh machine with Python 3.11:
#   make run    create the virtual environment if missing, install the runtime requirements and the
#               project, run the pipeline on the demo
#   make test   same set-up plus the development tools, then the whole test suite
# Every version, transitive ones included, comes from requirements.lock (make lock regenerates it).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
LOCK := requirements.lock
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
CONFIG ?= config/demo.yaml
PYTEST_ARGS ?=

export PREFECT_LOGGING_EXTRA_LOGGERS ?= tasks,models,config,flows
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: run test test-fast venv lint clean bench quality evaluate stack-up stack-down lock check-lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Runtime: requirements.txt and the project itself (editable, so its console scripts exist and any
# python of the venv imports it from this checkout), at the versions of the lock.
$(RUN_STAMP): requirements.txt $(LOCK) pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -r requirements.txt -c $(LOCK)
	$(PIP) install --quiet --no-deps -e .
	$(BIN)/python scripts/check_lock.py --lock $(LOCK)
	@touch $@

# Development tools on top (moto, SeaweedFS, pytest, ruff, mypy): after `make run` this adds only
# them; the runtime packages stay as they are.
$(DEV_STAMP): $(RUN_STAMP) requirements-dev.txt
	$(PIP) install --quiet -r requirements-dev.txt -c $(LOCK)
	$(BIN)/python scripts/check_lock.py --lock $(LOCK)
	@touch $@

venv: $(DEV_STAMP)

run: $(RUN_STAMP)
	$(BIN)/python -m flows.train_all_fusions --config $(CONFIG)

# Re-evaluate a finished run from the bucket alone (RUN=<id>; default: the newest run).
evaluate: $(RUN_STAMP)
	$(BIN)/python -m flows.evaluate --config $(CONFIG) $(if $(RUN),--run $(RUN),)

# The suite's UI test needs Debian's chromium: `browser` installs it first when it is missing.
test: $(DEV_STAMP) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The inner loop: the unit tier only (no Prefect run, no subprocess, no multi-epoch training).
test-fast: $(DEV_STAMP)
	$(BIN)/python -m pytest tests/unit -m "not slow" -q $(PYTEST_ARGS)

# Does the environment hold exactly the lock's versions? (The installs above check it too.)
check-lock: | $(BIN)/python
	$(BIN)/python scripts/check_lock.py --lock $(LOCK)

# Regenerate requirements.lock from requirements.txt + requirements-dev.txt with pip-tools, run
# from a throwaway environment. Existing pins are kept where they still fit; to move everything to
# the newest versions: make lock LOCK_ARGS=--upgrade (or --upgrade-package NAME). pip's local
# indexes and find-links are not written, and comment lines naming local paths are dropped.
PIP_TOOLS ?= pip-tools==7.6.2
LOCK_ARGS ?=
lock:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp/venv" && \
	"$$tmp/venv/bin/python" -m pip install --quiet --upgrade pip '$(PIP_TOOLS)' && \
	{ test ! -f $(LOCK) || cp $(LOCK) "$$tmp/lock"; } && \
	CUSTOM_COMPILE_COMMAND="make lock" "$$tmp/venv/bin/pip-compile" --quiet --allow-unsafe \
	  --strip-extras --no-emit-index-url --no-emit-find-links $(LOCK_ARGS) \
	  --output-file "$$tmp/lock" requirements.txt requirements-dev.txt && \
	grep -vE '^\s*#.*(file:|/opt/|/etc/|/tmp/|$(CURDIR))' "$$tmp/lock" > "$$tmp/clean" && \
	if grep -nE 'file:|/opt/|/etc/|/tmp/|$(CURDIR)|^-' "$$tmp/clean"; then \
	  echo "make lock: the lock above names local paths or pip options" >&2; exit 1; fi && \
	cp "$$tmp/clean" $(LOCK) && echo "wrote $(LOCK): $$(grep -c '^[A-Za-z]' $(LOCK)) pins"

# Local production-like stack (scripts/stack.py): Prefect server + UI on 127.0.0.1:4200, a process
# worker, SeaweedFS S3 on 127.0.0.1:8333 with the generated benchmark, every deployment of
# prefect.yaml. Ports and more: make stack-up STACK_ARGS="--prefect-port 4300 --workers 2".
STACK_DIR ?= .stack
STACK_ARGS ?=
stack-up: $(DEV_STAMP)
	$(BIN)/python -m scripts.stack up --dir $(STACK_DIR) $(STACK_ARGS)

stack-down:
	$(BIN)/python -m scripts.stack down --dir $(STACK_DIR)

# Streaming preprocessing on SeaweedFS behind a 0/20/50 ms proxy, as ratios to baselines of the
# same run: the decode bound, the naive reading, the s3torchconnector peer, the cache; then
# training: input stall against pure compute, concurrency 1 vs auto, peak RSS at N and 10N pairs
# (benchmarks/README.md; ~30-45 minutes on a 2-core machine); then end to end: one
# train-all-fusions run on the demo config, the wall time of each stage as Prefect recorded it
# (E2E_BENCH_ARGS, e.g. --repeats 3; ~5-8 minutes a run). Not part of `make test` (their smoke
# versions are).
# make bench BENCH_ARGS="--sizes demo --repeats 1" TRAIN_BENCH_ARGS="--repeats 1"
# make bench E2E_BENCH_ARGS="--repeats 3 --set training.keep_checkpoints=2"
BENCH_ARGS ?=
TRAIN_BENCH_ARGS ?=
E2E_BENCH_ARGS ?=
bench: $(DEV_STAMP)
	$(BIN)/python -m benchmarks.bench_stream $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.bench_train $(TRAIN_BENCH_ARGS)
	$(BIN)/python -m benchmarks.bench_e2e $(E2E_BENCH_ARGS)

# Detection quality of the three fusions on the synthetic benchmark, through the pipeline itself
# (benchmarks/README.md; hours on a small CPU machine). Not part of `make test`.
# make quality QUALITY_ARGS="--sizes demo --seeds 0 --no-ablation"
QUALITY_ARGS ?=
quality: $(RUN_STAMP)
	$(BIN)/python -m benchmarks.quality $(QUALITY_ARGS)

# Headless Chromium for the UI test (tests/e2e/test_browser.py): Debian's `chromium` package,
# installed with apt-get when missing (as root, else through sudo; needs the package registry).
# Nothing downloads a browser: no `playwright install`, Playwright drives this one.
.PHONY: browser
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=; else sudo=sudo; fi; \
	  echo "make browser: installing chromium (apt-get)"; \
	  $$sudo apt-get update -q && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
	@echo "make browser: $$(command -v chromium)"

lint: $(DEV_STAMP)
	$(BIN)/ruff format --check . && $(BIN)/ruff check . && $(BIN)/mypy tasks config models

clean:
	rm -rf bucket .pytest_cache
