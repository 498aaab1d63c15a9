# Two commands for a fresh clone: `make demo` (set up + run the embedded experiment) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test test-fast ui validate clean lock check-latest

setup: $(VENV)/.installed

# Installs exactly the versions in requirements.lock (the set the suite passed with).
$(VENV)/.installed: pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0   # first, so nothing pulls a CUDA build
	$(PIP) install -q -c requirements.lock -e ".[test]"
	touch $@

lock:   # newest versions pyproject.toml allows, full suite in a throwaway env; rewrites requirements.lock only if it passes
	python3 tools/deps.py lock

check-latest:   # newest allowed versions in a throwaway env: fast tests + fused-forward checks, prints what broke
	python3 tools/deps.py check-latest

demo: setup
	$(VENV)/bin/mosaic demo

# unit + graph run in one pytest-xdist worker per core (each worker gets its share of torch threads);
# services, browsers, PostgreSQL, killed runs and the real Gemma run one at a time after them.
PARALLEL := -n logical --dist worksteal

test: setup   # every tier: unit, graph, system, integration (what CI runs)
	$(PY) -m pytest -q -p no:cacheprovider $(PARALLEL) tests/unit tests/graph -m "not integration"; fast=$$?; \
	$(PY) -m pytest -q -p no:cacheprovider -m "system or integration"; rest=$$?; \
	exit $$(( fast || rest ))

test-fast: setup   # unit + graph tiers without the real Gemma: the inner loop
	$(PY) -m pytest -q -p no:cacheprovider $(PARALLEL) tests/unit tests/graph -m "not integration"

ui: setup
	$(VENV)/bin/mosaic ui

validate: setup
	$(VENV)/bin/dagster definitions validate -w workspace.yaml

clean:
	rm -rf mosaic_data .dagster_home

.PHONY: bench
bench: setup   # performance benchmark: sections 1-4 ~7 min on 2 idle cores, 5-6 (SAE training, wide SAEs up to 1M: ~8 GB RAM) longer; 7-8 opt-in
	$(PY) -m bench.run
