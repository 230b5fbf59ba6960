# The two commands a newcomer types: `make up` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# llama.cpp threads etc. come from lamina.yaml; CMAKE_BUILD_PARALLEL_LEVEL only speeds up the one-time
# compile of llama-cpp-python (pip caches the wheel it builds).
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: up test lint typecheck unit install dev bench bench-data clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit("Lamina needs Python 3.11+, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev-installed

## make up: create the environment, install, and run the stack on its embedded defaults
up: install
	$(BIN)/lamina up $(ARGS)

## make test: lint (ruff), types (mypy --strict on src/ and tests/) and the whole test suite, with a
## coverage gate (fail_under in pyproject.toml)
test: dev lint typecheck unit

lint: dev
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: dev
	$(BIN)/mypy

## the suite runs in TEST_WORKERS processes (pytest-xdist, a test module per worker at a time), each kept to
## its share of the CPUs (tests/conftest.py), the heaviest modules first (pytest-xdist's own order puts modules
## of many tests first, which left the minute-long modules of one or two tests to the end); TEST_WORKERS=0 runs
## it in this one process
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

unit: dev
	$(BIN)/pytest --cov --cov-report=term -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

## make bench: gateway streaming tokens/s next to llama-cpp-python in-process (not a test)
bench: dev
	$(BIN)/python bench/stream_tokens.py

## make bench-data: the data layer's targets in one run (about 20 minutes on 2 cores; needs ../shared/data)
bench-data: dev
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python bench/ingest_throughput.py --docs 600
	$(BIN)/python bench/ann_recall.py
	$(BIN)/python bench/retrieval_scifact.py --backend both

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
