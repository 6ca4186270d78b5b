VENV ?= .venv
PY := $(VENV)/bin/python
# `make run` needs only nlnet itself; the tests also need the dev tools, the benchmark peers and the model code
# of mmaction2 and PySlowFast (for the by-value tests of the weight importers).
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test test-all test-install lint bench clean

$(RUN_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(TEST_STAMP): $(RUN_STAMP)
	$(PY) -m pip install -q -e ".[dev,bench,mmaction,pyslowfast]"
	touch $@

run: $(RUN_STAMP)
	$(VENV)/bin/nlnet demo

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check nlnet tests benchmarks

test: lint
	$(PY) -m pytest -q

test-all: lint
	$(PY) -m pytest -q -m ""

# Build the wheel, install it into a fresh virtual environment, run nlnet demo and train from another folder.
test-install: $(TEST_STAMP)
	$(PY) -m pytest -q -m slow tests/test_install.py

bench: $(TEST_STAMP)
	$(PY) benchmarks/block.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
