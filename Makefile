# `make demo` runs the main job; `make test` runs the test suite. Each creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): requirements-dev.txt pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/hawada optimize recipes/cpu/resnet18_digits.yaml --set output.overwrite=true

test: $(STAMP)
	$(BIN)/ruff check hawada tests benchmarks
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest benchmarks/ --benchmark-only -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
