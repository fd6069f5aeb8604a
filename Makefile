# The two commands: `make run` (service on the embedded backend) and `make test`.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test test-quick mongo-server lint clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/model-service serve

# Everything, both backends. The FerretDB test server builds itself with Go on
# first use (tests/support/mongo_server.py); set MONGODB_URL to use a real MongoDB.
test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# Inner loop: embedded backend only, no slow tests.
test-quick: $(STAMP)
	$(BIN)/pytest -q -m "not slow" -k "not mongodb" $(PYTEST_ARGS)

mongo-server: $(STAMP)
	$(BIN)/python -c "from tests.support.mongo_server import build; print(build())"

clean:
	rm -rf $(VENV) .cache .pytest_cache data
