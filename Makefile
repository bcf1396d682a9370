# teepsi: `make demo` and `make test` work on a fresh machine with Python 3.11 and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: fuzz bench bench-quick bench-huge demo demo-2 demo-3 demo-contract test test-fast test-integration test-deploy lint format typecheck suite proto install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: demo-3 demo-2 demo-contract

demo-3: $(STAMP)
	$(VENV)/bin/teepsi demo --parties 3

demo-2: $(STAMP)
	$(VENV)/bin/teepsi demo --parties 2

demo-contract: $(STAMP)
	$(VENV)/bin/teepsi demo --contract

# Tests (docs/testing.md): tests/unit in-process, tests/integration with processes and
# servers on loopback, tests/deploy for manifests, images and packaging.
test: lint typecheck suite

# Every test, with the coverage of src/teepsi (the floor is in pyproject.toml).
suite: $(STAMP)
	$(VENV)/bin/pytest -q --cov --cov-report=term

# The unit tests only: about a minute on 2 busy cores.
test-fast: $(STAMP)
	$(VENV)/bin/pytest -q tests/unit

test-integration: $(STAMP)
	$(VENV)/bin/pytest -q tests/integration

test-deploy: $(STAMP)
	$(VENV)/bin/pytest -q tests/deploy

# ruff, then the layering contracts of docs/architecture.md (import-linter, .importlinter)
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts bench deploy fuzz
	$(VENV)/bin/lint-imports --no-cache

# Rewrites files: ruff's formatting (pre-commit checks it)
format: $(STAMP)
	$(VENV)/bin/ruff format src tests scripts bench deploy fuzz

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Benchmarks (issues 4 and 11): separate processes vs polars, DuckDB and openmined-psi on
# text, CSV and Parquet; docs/benchmarks.md says what is measured.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/run.py --repeat 3 --quiet-wait 300 --write-docs

bench-quick: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/run.py --quick

# 100M x 100M, text and CSV, 2 parties (not in CI: ~18 GB of inputs and up to 19 GB of
# outputs, deleted afterwards; the run checks the free space first). Writes only the 100M section of docs/benchmarks.md.
# A small trial: make bench-huge ROWS=1000000
ROWS ?= 100000000
QUIET_WAIT ?= 300
bench-huge: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/run.py --huge --sizes $(ROWS) --quiet-wait $(QUIET_WAIT) --delete-data --write-docs

# Long fuzzing runs (CI runs each harness for a bounded number of iterations).
FUZZ_TIME ?= 3600
fuzz: $(STAMP)
	$(PY) fuzz/run.py --time $(FUZZ_TIME)

# Regenerate the gRPC code after editing src/teepsi/protocol/teepsi.proto.
proto: $(STAMP)
	PATH=$(VENV)/bin:$$PATH bash scripts/gen_proto.sh

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.*
