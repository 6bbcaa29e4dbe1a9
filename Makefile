# make install / test / demo / bench. Everything installs into .venv through constraints.txt.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
JOBS    ?= 2

.PHONY: install test test-full test-opinfo demo bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) -q tests

test-full: $(STAMP)
	BRIDGE_TEST_FULL=1 BRIDGE_TEST_XLA_OPT=1 $(BIN)/python -m pytest -n $(JOBS) -q tests

# the OpInfo sweep with 3 samples per op and dtype (CI runs it after make test; test-full runs all samples)
test-opinfo: $(STAMP)
	BRIDGE_OPINFO=1 $(BIN)/python -m pytest -n $(JOBS) -q tests/converters/ops/test_opinfo.py

demo: $(STAMP)
	$(BIN)/python -m bridge.demo

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) .pytest_cache
