# The two commands of the README: `make demo` and `make test`. Both build ./.venv on first use.
# make test: pytest-xdist, one worker a core; each worker takes whole test files, so a module
# fixture (a training run, a conversion) is built once and shared by its tests. The longest
# files go first (tests/durations.json, rewritten by `make durations`), so no long one is left to
# run alone at the end.
# make test-fast: the same without the tests marked slow (pytest.ini): no training in a
# subprocess, under a minute on 2 cores.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: demo test test-fast durations bench clean

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder tests

durations: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder --store-durations tests

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --dist loadfile -m "not slow" tests

demo: $(VENV)/.installed
	$(PY) demo.py

bench: $(VENV)/.installed
	$(PY) -m bench.convert_benchmark

clean:
	rm -rf $(VENV) demo_output
