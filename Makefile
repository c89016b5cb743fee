# `make quickstart` and `make test` set everything up in .venv on first use.
# TORCH pins the build to install first: the CPU wheel on CI; override it for another build,
# e.g. `make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
OUT ?= quickstart-out
# llama.cpp for the GGUF tests (tests/test_gguf.py): PyPI has llama-cpp-python only as source, a
# ~10-minute C++ build on 2 cores, so it is built once into a wheel kept in WHEELS and installed
# from there on later setups. Portable flags (no -march=native) keep the wheel usable on any x86-64
# with AVX2; tests, examples, tools and the multimodal library are not needed.
LLAMA_CPP ?= llama-cpp-python==0.3.36
WHEELS ?= $(HOME)/.cache/wren-wheels
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF

.PHONY: setup llama-cpp quickstart test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

$(BIN)/.llama-cpp: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet --only-binary llama-cpp-python --find-links $(WHEELS) "$(LLAMA_CPP)" \
	|| { CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
	       $(BIN)/python -m pip wheel --quiet --no-deps "$(LLAMA_CPP)" -w $(WHEELS) \
	     && $(BIN)/python -m pip install --quiet --only-binary llama-cpp-python --find-links $(WHEELS) "$(LLAMA_CPP)"; }
	touch $@

llama-cpp: $(BIN)/.llama-cpp

setup: $(BIN)/.installed $(BIN)/.llama-cpp

quickstart: $(BIN)/.installed
	$(BIN)/wren quickstart --out $(OUT)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint $(BIN)/.llama-cpp
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OUT)
