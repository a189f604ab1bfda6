# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need
# into .venv (Python packages) and ~/.cache/clipstream (Kafka's jars, via mvn).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install broker-jars demo test test-fast lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

broker-jars: install
	$(PY) -c "from clipstream.streams.broker import resolve_jars; print(len(resolve_jars()), 'jars')"

demo: broker-jars
	$(VENV)/bin/clipstream demo

lint: install
	$(VENV)/bin/ruff check .

test: broker-jars lint
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not integration"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
