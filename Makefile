# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_output

.PHONY: setup demo test test-slow bench notebooks paper clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py cryojax_mw/nn/_winograd_cpu.cc
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,notebooks]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m cryojax_mw.cli demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q -n 2

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/bench_projector.py
	$(PY) benchmarks/bench_simulate.py
	$(PY) benchmarks/bench_samplers.py

notebooks: $(STAMP)
	$(PY) notebooks/run_notebooks.py

paper: $(STAMP)
	$(PY) paper/make_figures.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
