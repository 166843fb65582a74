# The two commands of the README: `make demo` and `make test`. Both build ./.venv on first use.
# make test: pytest-xdist, one worker a core; each worker takes whole test files, so a module
# fixture (a training run, a conversion) is built once and shared by its tests.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --dist loadfile tests

demo: $(VENV)/.installed
	$(PY) demo.py

bench: $(VENV)/.installed
	$(PY) -m bench.convert_benchmark

clean:
	rm -rf $(VENV) demo_output
