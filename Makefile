# OmniSphere release orchestrator. `make demo` and `make test` are all a newcomer needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REQUIREMENTS := requirements.txt requirements-dev.txt constraints.txt pyproject.toml
STAMP := $(VENV)/.installed-$(shell cat $(REQUIREMENTS) | cksum | cut -d' ' -f1)
# `make up` runs `airflow standalone`; `make up EXECUTOR=celery` runs the production topology (devstack/topology.py).
EXECUTOR ?= standalone
# `make up AUTH=fab` runs production's FAB auth manager (roles from the catalog, one user per role, passwords printed
# and kept in .airflow/fab-users.json, mode 0600) instead of the simple one (one admin who may do everything).
AUTH ?= simple

.PHONY: all venv lint test test-long test-chaos test-fast test-ui compose-check demo devstack devstack-stop up down bench constraints clean

all: venv

venv: $(STAMP)

# The venv (the development set: runtime + tests + linters) is rebuilt only when one of $(REQUIREMENTS) changes.
$(STAMP): $(REQUIREMENTS)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10+ is required")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

# ruff (pycodestyle, pyflakes, bugbear, bandit, Airflow's AIR rules...) and mypy, as configured in pyproject.toml.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The chaos tests (a release under killed parts and injected faults on the Celery topology, ~10 min) have a target
# of their own, so that make test stays well under 20 minutes; .ci/run runs both.
test: lint
	$(PY) -m pytest -q -n 2 --durations=30 --ignore=tests/chaos -m "not long"

# Scenarios of several whole releases each (promotion, progressive delivery, release news, release trains, the
# Celery topology under killed parts, the live window waits, the live approval UI): ~15 min, kept out of make test so that it stays well
# under 20 minutes (it took 21 min with them). CI runs it after make test.
test-long: venv
	$(PY) -m pytest -q -n 2 --ignore=tests/chaos -m long

test-chaos: venv
	$(PY) -m pytest -q -m chaos tests/chaos

test-fast: venv
	$(PY) -m pytest -q tests/unit tests/dags

# Only the browser tests (Debian's chromium, headless); they start the devstack and a live Airflow.
test-ui: venv
	$(PY) -m pytest -q -m ui

# docker-compose.yaml against the compose specification's JSON schema (the tests also do this, and more).
compose-check: venv
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yaml

demo: venv
	$(PY) scripts/demo.py

devstack: venv
	$(PY) -m devstack start

devstack-stop: venv
	$(PY) -m devstack stop

up: venv
	OMNI_AIRFLOW_AUTH=$(AUTH) $(PY) scripts/airflow_local.py up --executor $(EXECUTOR)
	@if [ "$(AUTH)" = fab ]; then $(PY) -m devstack.airflow_server users .airflow; fi

down: venv
	$(PY) scripts/airflow_local.py down

bench: venv
	$(PY) -m bench

# Re-resolve the pinned set after editing requirements.txt or requirements-dev.txt (then commit constraints.txt).
# One set pins both: the runtime set is a subset of the development set.
constraints:
	rm -rf .venv-resolve && $(PYTHON) -m venv .venv-resolve
	.venv-resolve/bin/pip install --quiet -r requirements-dev.txt
	.venv-resolve/bin/pip freeze --exclude-editable | grep -v '^omnisphere-release' > constraints.txt
	rm -rf .venv-resolve

clean: devstack-stop
	rm -rf .airflow artifacts
