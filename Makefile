# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_PRESET ?= lite

.PHONY: install test demo search-demo bench lint clean

install: $(STAMP)

# Reinstall whenever the dependency list changes; torch is pinned so pip takes the wheel on disk.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/amldist demo --preset $(DEMO_PRESET)

# The demo (its finished stages reused), then asymmetric search from the exported students (docs/SEARCH.md).
search-demo: $(STAMP)
	$(VENV)/bin/amldist demo --preset $(DEMO_PRESET) --search

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check amldist tests scripts benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
