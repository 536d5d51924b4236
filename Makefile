# synthprune: `make demo` sets everything up and runs the main job; `make test` sets up and tests.
# Override TORCH to bring your own build, e.g. `make test TORCH='torch>=2.3'`.
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint setup clean

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) -m ruff check src tests examples
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests examples

setup: $(STAMP)

# torch first and pinned: a bare `torch` requirement would pull gigabytes of CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV) || { command -v apt-get >/dev/null && apt-get update -qq && \
		apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
