# Every target does its own set-up from a fresh clone: a .venv made with `python3 -m venv`, then pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: install test lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,examples]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --doctest-modules tests jaxsparse pallas_kernels

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

bench: $(STAMP)
	$(BIN)/python benchmarks/train_overhead.py

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache .hypothesis *.egg-info
