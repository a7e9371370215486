# raygen: the README's two commands, plus lint and the benchmarks.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU machines install this torch wheel (on local disk here) before anything that
# depends on torch, so pip never pulls a multi-GB CUDA build. GPU machines:
# `make TORCH_SPEC=torch install` to take the CUDA build instead.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install quickstart test test-fast lint bench clean schemas

install: $(VENV)/.installed

# The container images install with the same script (cluster/images/).
$(VENV)/.installed: pyproject.toml cluster/images/install.sh
	TORCH_SPEC="$(TORCH_SPEC)" cluster/images/install.sh $(VENV) -e ".[test]"
	touch $@

# Train the tiny code LM, deploy it behind its Fairlearn audit on Ray Serve, ask it for
# completions over HTTP, shut down (serving/examples/quickstart.py strings the commands).
quickstart: install
	$(PY) serving/examples/quickstart.py

# The Azure Storage emulator for the storage tests (npm; the other test servers are Python).
AZURITE := $(VENV)/azurite/node_modules/.bin/azurite-blob
$(AZURITE):
	npm install --prefix $(VENV)/azurite --no-audit --no-fund --silent azurite@3.37.0

test: install $(AZURITE)
	$(VENV)/bin/pytest -q

# Unit tests only (no Ray, no servers): a couple of minutes, for the edit-test loop.
test-fast: install
	$(VENV)/bin/pytest -q -m "not integration"

# The benchmarks (not tests): each prints a table and writes benchmarks/results/<name>.json.
bench: install
	$(PY) benchmarks/run_all.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .pytest_cache

# The specs' JSON Schemas, for editors (the example specs point at them); a test checks
# they match the code.
schemas: install
	for kind in train sweep audit deploy; do \
		$(VENV)/bin/raygen schema $$kind > docs/schemas/$$kind.schema.json; done
