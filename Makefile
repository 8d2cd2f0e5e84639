# CLMS referral services. `make run` and `make test` install what they need into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-unit test-integration boundaries bench schema clean-data clean venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	@$(VENV)/bin/clms dev

# The whole suite on the broker CLMS_BROKER picks (Apache Kafka where java and mvn answer), then
# the smoke set on Tansu so the Java-less path keeps working.
test: $(STAMP)
	@$(PY) -m pytest -q -ra $(PYTEST_ARGS)
	@echo "--- smoke set on Tansu (the Java-less fallback broker) ---"
	@CLMS_BROKER=tansu $(PY) -m pytest -q -ra -m smoke $(PYTEST_ARGS)

test-unit: $(STAMP)
	@$(PY) -m pytest -q tests/unit

test-integration: $(STAMP)
	@$(PY) -m pytest -q tests/integration

# The import contracts of pyproject.toml ([tool.importlinter]); `make test` checks them too
# (tests/unit/test_boundaries.py).
boundaries: $(STAMP)
	@$(VENV)/bin/lint-imports --no-cache

schema: $(STAMP)
	@$(VENV)/bin/clms schema

bench: $(STAMP)
	@$(PY) -m bench

clean-data:
	rm -rf .clms/

clean:
	rm -rf $(VENV) .clms/ .pytest_cache

.PHONY: lock
lock: $(STAMP)  ## pin the runtime dependencies for the image (requirements.lock)
	@$(PY) deploy/lock.py
