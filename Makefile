# Two commands set up a fresh machine:
#   make serve   - serve the example models on :8080 (REST) and :8081 (gRPC)
#   make test    - run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test install examples lint bench bench-batching clean

# torch first, pinned: the runtime extras would otherwise resolve torch to a multi-GB CUDA build.
TORCH ?= torch==2.13.0

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet '$(TORCH)'
	$(BIN)/pip install --quiet -e '.[sklearn,test,loadtest]'
	touch $(STAMP)

install: $(STAMP)

examples/models/iris/model.joblib: examples/models/iris/train.py | $(STAMP)
	$(BIN)/python examples/models/iris/train.py

examples: examples/models/iris/model.joblib

serve: install examples
	$(BIN)/meshserve serve --model-dir examples/models

test: install examples
	$(BIN)/ruff check .
	$(BIN)/pytest tests --ignore=tests/clients -q
	# tritonclient registers the same gRPC descriptors as meshserve's stubs: own process.
	$(BIN)/pytest tests/clients -q

lint: install
	$(BIN)/ruff check .

bench: install examples
	$(BIN)/python loadtests/bench.py --compare

bench-batching: install
	$(BIN)/python loadtests/batching_bench.py --clients 16 --duration 15

clean:
	rm -rf $(VENV) examples/models/iris/model.joblib .pytest_cache
