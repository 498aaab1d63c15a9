# Two commands for a fresh clone: `make demo` (set up + run the embedded experiment) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test ui validate clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0   # first, so nothing pulls a CUDA build
	$(PIP) install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/mosaic demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

ui: setup
	$(VENV)/bin/mosaic ui

validate: setup
	$(VENV)/bin/dagster definitions validate -w workspace.yaml

clean:
	rm -rf mosaic_data .dagster_home

.PHONY: bench
bench: setup   # performance benchmark (~7 min on 2 idle cores): table on stdout, JSON in bench/results/
	$(PY) -m bench.run
