# Dask Model Runner: `make demo` and `make test` are all a new user needs.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install osml-client demo test test-all lint security audit typecheck bench lock clean check-notebooks strip-notebooks

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (or: make PYTHON=python3)"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint constraints.txt -e '.[test,cloud,onnx]'
	touch $(STAMP)

# OSML's own integration-test client (osml-model-runner-test, with the old boto3 it pins) in its
# own venv, so that our .venv keeps its botocore; tests/test_osml_client.py runs it against the worker
OSMLCLIENTENV := .osmlclientenv
OSMLCLIENTREQ := tests/data/osml/client-requirements.txt
osml-client: $(OSMLCLIENTENV)/.installed

$(OSMLCLIENTENV)/.installed: $(OSMLCLIENTREQ)
	test -x $(OSMLCLIENTENV)/bin/python || $(PYTHON) -m venv $(OSMLCLIENTENV)
	$(OSMLCLIENTENV)/bin/python -m pip install --quiet --no-deps -r $(OSMLCLIENTREQ)
	touch $@

demo: install
	$(BIN)/model-runner demo --output-dir demo-output

test: install osml-client
	$(BIN)/ruff check --select S pipeline graphs
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: install osml-client
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check pipeline graphs tests benchmarks

# ruff's bandit rules (S) over the package; exceptions are per-file ignores in pyproject.toml
security: install
	$(BIN)/ruff check --select S pipeline graphs

# pip-audit of the pinned stack in its own venv (needs PyPI's JSON API, or AUDIT_SERVICE=osv and
# api.osv.dev): exit 0 clean, 1 known vulnerabilities, 2 no result (service unreachable)
AUDITENV      := .auditenv
AUDIT_SERVICE ?= pypi
audit: security
	test -x $(AUDITENV)/bin/pip-audit || { $(PYTHON) -m venv $(AUDITENV) \
	  && $(AUDITENV)/bin/python -m pip install --quiet pip-audit; }
	$(AUDITENV)/bin/python scripts/audit.py constraints.txt $(AUDIT_SERVICE)

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/run_all.py

check-notebooks: install
	$(BIN)/python -m pytest -q tests/test_notebooks.py -k no_outputs

strip-notebooks: install
	$(BIN)/python scripts/strip_notebooks.py notebooks/*.ipynb

lock:
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv && .lockenv/bin/pip install -q -e '.[test,cloud,onnx]' \
	  && .lockenv/bin/pip freeze --exclude-editable > constraints.txt && rm -rf .lockenv

clean:
	rm -rf $(VENV) $(AUDITENV) $(OSMLCLIENTENV) demo-output .pytest_cache .mypy_cache .ruff_cache
