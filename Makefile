# teepsi: `make demo` and `make test` work on a fresh machine with Python 3.11 and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: fuzz bench bench-quick bench-huge demo demo-2 demo-3 demo-contract test lint typecheck unit proto install clean

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

test: lint typecheck unit

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts bench deploy fuzz

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(VENV)/bin/pytest -q

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
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
