VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-all test-install lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,bench]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/nlnet demo

lint: $(STAMP)
	$(VENV)/bin/ruff check nlnet tests benchmarks

test: lint
	$(PY) -m pytest -q

test-all: lint
	$(PY) -m pytest -q -m ""

# Build the wheel, install it into a fresh virtual environment, run nlnet demo and train from another folder.
test-install: $(STAMP)
	$(PY) -m pytest -q -m slow tests/test_install.py

bench: $(STAMP)
	$(PY) benchmarks/block.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
