# The README's commands. `make test` works on a fresh machine: it installs the Debian
# packages it needs (graphviz; chromium for the browser tests; PostgreSQL client tools are
# optional), makes .venv and runs the suite on SQLite and on PostgreSQL.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Exact versions of everything `make` installs; `make lock` regenerates it from the ranges
# in pyproject.toml (newest that fit), and the next `make` installs exactly those.
CONSTRAINTS := constraints.txt
APT_PKGS := graphviz chromium

.PHONY: run test check test-fast lint bench bench-dbos services worker clean deps lock

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	@touch $(STAMP)

lock: $(STAMP)
	$(BIN)/pip-compile --quiet --upgrade --extra dev --strip-extras --no-emit-index-url \
	  --no-emit-find-links --output-file $(CONSTRAINTS) pyproject.toml

deps:
	@if ! command -v dot >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null; \
	  else echo "note: apt-get install $(APT_PKGS) (svg/png diagrams, browser tests)"; fi; \
	fi

# `make run PORT=8001`: the API (and the embedded services under /services) on another
# port; commands that reach those services from outside (`resume`, `worker`) then need
# ORDER_SAGA_FALLBACK_SERVICES_URL=http://127.0.0.1:8001/services.
PORT ?= 8000

run: $(STAMP)
	$(BIN)/order-saga serve --host 127.0.0.1 --port $(PORT)

services: $(STAMP)
	$(BIN)/order-saga services --port 8100

worker: $(STAMP)
	$(BIN)/order-saga worker

# `make test` (the README's, and so CI's, command) is the whole check: a format, lint or
# type error fails it as a failing test does.
test: check

check: deps $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	@scripts/ensure-postgres.sh
	@scripts/ensure-rabbitmq.sh
	@scripts/ensure-promtool.sh $(BIN)
	# Three workers on 2 cores: the suite waits more than it computes (process starts, kills,
	# leases); same clone, minutes apart: 9 min 41 s with -n 2, 8 min 13 s with -n 3.
	$(BIN)/pytest -n 3 --dist loadgroup --durations=25

test-fast: $(STAMP)
	$(BIN)/pytest -n 3 --dist loadgroup -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	@scripts/ensure-postgres.sh || echo "bench: PostgreSQL figures will be skipped"
	$(BIN)/python -m bench $(BENCH_ARGS)

# The DBOS Transact + FastAPI peer of `python -m bench --only dbos`, in its own environment
# (.venv-bench, bench/requirements-dbos.txt), never in order-saga's; the phase makes it too.
bench-dbos: $(STAMP)
	$(BIN)/python -m bench.dbos_peer

clean:
	rm -rf $(VENV) .venv-bench *.db *.db-wal *.db-shm
