# The two commands: `make run` and `make test`. Both build .venv from nothing but Python 3.11.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
HOST   ?= 127.0.0.1
PORT   ?= 8080
MONGO_PORT ?= 27117

.PHONY: run test install bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

## Serve FHIR at http://$(HOST):$(PORT)/fhir; starts the embedded mongod unless MONGODB_URI is set.
run: $(STAMP)
	$(BIN)/fhir-server run --host $(HOST) --port $(PORT) --mongo-port $(MONGO_PORT)

## Install what the tests need and pass them (each run starts and removes its own mongod).
test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .data
