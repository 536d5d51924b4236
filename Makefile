# synthprune: `make demo` sets everything up and runs the main job; `make test` sets up and tests.
# The demo trains the reference MLP on Fashion-MNIST with strategic synthesis (~2 min on 2 cores).
# Override TORCH to bring your own build, e.g. `make test TORCH='torch>=2.3'`.
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= runs/demo
SUDO   := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test lint setup data clean report

demo: $(STAMP) data
	rm -rf $(DEMO)
	$(PY) -m synthprune train --preset fmnist-mlp --grow synthesis --epochs 10 --out $(DEMO)
	@echo "figures: $(DEMO)/figures/"

# Debian's dataset-fashion-mnist, where apt exists (elsewhere pass --data-dir to train).
data:
	@if [ ! -e $(FMNIST) ] && command -v apt-get >/dev/null; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; fi

# The suite runs with COLUMNS unset (80 columns, as in CI), then the output tests at 60 columns:
# printed paths, tables and --help must stay whole whatever the width.
NARROW_TESTS := tests/test_cli.py tests/test_sweep.py tests/test_bad_input.py tests/test_api_contracts.py
test: $(STAMP)
	$(PY) -m ruff check src tests examples experiments benchmarks
	env -u COLUMNS $(PY) -m pytest -q
	COLUMNS=60 $(PY) -m pytest -q $(NARROW_TESTS)

# docs/RESULTS.md §6-§8: every generated table and figure, from the records in experiments/results.
report: $(STAMP)
	$(PY) experiments/build_report.py

lint: $(STAMP)
	$(PY) -m ruff check src tests examples experiments benchmarks

setup: $(STAMP)

# torch first and pinned: a bare `torch` requirement would pull gigabytes of CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV) || { command -v apt-get >/dev/null && apt-get update -qq && \
		apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev,onnx,lightning]'
	@# the csr layer's C++ kernel, built once (~20 s); without a compiler csr uses torch.sparse
	$(PY) -c "from synthprune import csr_kernel; print('csr path:', csr_kernel.describe())"
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
