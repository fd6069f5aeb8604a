# The two commands: `make run` (service on the embedded backend) and `make test`.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint test-quick bench bench-quick bench-pull bench-snapshots bench-tools ui-browser bench-ui ui-screenshots mongo-server clean

# The client is its own distribution (client/); the server's CLI needs it, so both go in one pip command.
$(STAMP): setup.cfg pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable ./client --editable '.[test,bench]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/model-service serve

# Everything, both backends. The FerretDB test server builds itself with Go on
# first use (testkit/mongo_server.py); set MONGODB_URL to use a real MongoDB.
test: $(STAMP) lint
	-@$(MAKE) --no-print-directory bench-tools
	-@$(MAKE) --no-print-directory ui-browser
	$(BIN)/pytest $(PYTEST_ARGS)

# ruff (pyproject.toml); any finding fails `make test` before a test runs.
lint: $(STAMP)
	$(BIN)/ruff check

# Inner loop: embedded backend only, no slow tests.
test-quick: $(STAMP)
	$(BIN)/pytest -q -m "not slow" -k "not mongodb" $(PYTEST_ARGS)

# Load tests against nginx and the raw driver (bench/README.md); needs nginx and
# wrk from Debian (installed here when missing and running as root).
bench: $(STAMP) bench-tools
	$(BIN)/python -m bench $(BENCH_ARGS)

# The client's parallel pull of a 1 GB file against curl and aria2c -x8.
bench-pull: $(STAMP) bench-tools
	$(BIN)/python -m bench.pull $(BENCH_ARGS)

# Multi-file versions: delta bytes, warm fetch, cold pull against aria2c, the tar against nginx.
bench-snapshots: $(STAMP) bench-tools
	$(BIN)/python -m bench.snapshots $(BENCH_ARGS)

bench-quick: $(STAMP) bench-tools
	$(BIN)/python -m bench --quick $(BENCH_ARGS)

bench-tools:
	@command -v nginx >/dev/null && command -v wrk >/dev/null && command -v aria2c >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk aria2 >/dev/null; } || \
	  { echo "bench needs nginx, wrk and aria2c: apt-get install nginx-light wrk aria2" >&2; exit 1; }

# Chromium from Debian for the web UI's browser tests and screenshots (Playwright
# drives it; no browser can be downloaded). Installed when missing and running as root.
ui-browser:
	@command -v chromium >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  { echo "the UI browser tests need Chromium: apt-get install chromium" >&2; exit 1; }

# The web UI's render time against the JSON API, 10,000 models (bench/ui.py).
bench-ui: $(STAMP)
	$(BIN)/python -m bench.ui $(BENCH_ARGS)

# docs/ui/*.png, shown in the README.
ui-screenshots: $(STAMP) ui-browser
	$(BIN)/python -m bench.ui_screenshots

mongo-server: $(STAMP)
	$(BIN)/python -c "from testkit.mongo_server import build; print(build())"

clean:
	rm -rf $(VENV) .cache .pytest_cache data
