# Every target does its own set-up from a fresh clone: a .venv made with `python3 -m venv`, then pip.
# Two suites: Python 3.11 with the oldest supported jax (pip resolves 0.10.x there) and Python 3.12 with the newest.
PYTHON ?= python3
PYENV_ROOT ?= $(HOME)/.pyenv
PYTHON312 ?= $(firstword $(wildcard $(PYENV_ROOT)/versions/3.12*/bin/python3.12) python3.12)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: install test test312 test-all lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,examples]'
	$(BIN)/python -c "import jax, flax, optax; print('installed: jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --doctest-modules tests jaxsparse pallas_kernels

# The same suite under Python 3.12 with the newest jax, in its own venv.
test312:
	$(MAKE) test PYTHON=$(PYTHON312) VENV=.venv312

test-all: test test312

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

bench: $(STAMP)
	$(BIN)/python benchmarks/train_overhead.py

clean:
	rm -rf .venv .venv312 .jax_cache .pytest_cache .hypothesis *.egg-info
