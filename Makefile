# The README's commands. `make test` works on a fresh machine: it installs the Debian
# packages it needs (graphviz, PostgreSQL client tools are optional), makes .venv and runs
# the suite on SQLite and on PostgreSQL.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
APT_PKGS := graphviz

.PHONY: run test test-fast lint bench services worker clean deps

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

deps:
	@if ! command -v dot >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null; \
	  else echo "note: install Graphviz (apt-get install graphviz) for svg/png diagrams"; fi; \
	fi

run: $(STAMP)
	$(BIN)/order-saga serve --host 127.0.0.1 --port 8000

services: $(STAMP)
	$(BIN)/order-saga services --port 8100

worker: $(STAMP)
	$(BIN)/order-saga worker

test: deps $(STAMP)
	@scripts/ensure-postgres.sh
	$(BIN)/pytest -n 2 --dist loadgroup

test-fast: $(STAMP)
	$(BIN)/pytest -n 2 --dist loadgroup -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	@scripts/ensure-postgres.sh || echo "bench: PostgreSQL figures will be skipped"
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.db *.db-wal *.db-shm
