# gpugate: `make run` starts the whole stack, `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: run test lint bench redis-server wrk chromium llama-server clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

# Tests and the private Redis of `make run` need a redis-server binary (Debian's package).
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null; \
	  else echo "redis-server is missing: install Debian's redis-server package" >&2; exit 1; fi; }

# The load tool of bench/admission (Debian's package).
wrk:
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk) >/dev/null; \
	  else echo "wrk is missing: install Debian's wrk package" >&2; exit 1; fi; }

# The browser of tests/test_console.py (Debian's package): Playwright drives it and downloads none.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null; \
	  else echo "chromium is missing: install Debian's chromium package" >&2; exit 1; fi; }

# llama.cpp's llama-server, the real engine of tests/test_engine.py and `python -m bench engine`,
# built from the source the llama-cpp-python sdist vendors (PyPI is the one registry reached):
# only the server target, no web UI download, no CPU-tied (native) code, no TLS. The binary is
# cached outside the checkout, keyed by the pinned version, so that a fresh clone on the same
# machine (what CI runs) builds nothing: only a machine's first run pays (10-40 min on 2 cores).
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_CACHE := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/gpugate/llama.cpp-$(LLAMA_CPP_PYTHON)
LLAMA_SERVER := $(LLAMA_CACHE)/bin/llama-server

llama-server: $(LLAMA_SERVER)

$(LLAMA_SERVER): | $(STAMP)
	@command -v cmake >/dev/null 2>&1 && command -v g++ >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++) >/dev/null; \
	  else echo "cmake and g++ are missing: install Debian's cmake and g++ packages" >&2; exit 1; fi; }
	@rm -rf $(LLAMA_CACHE)/src $(LLAMA_CACHE)/build; mkdir -p $(LLAMA_CACHE)/src $(LLAMA_CACHE)/bin
	$(PY) -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
	  -d $(LLAMA_CACHE)/src llama-cpp-python==$(LLAMA_CPP_PYTHON)
	tar -xzf $(LLAMA_CACHE)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_CACHE)/src
	cmake -S $(LLAMA_CACHE)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp \
	  -B $(LLAMA_CACHE)/build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
	  -DGGML_NATIVE=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
	cmake --build $(LLAMA_CACHE)/build --target llama-server -j2 >/dev/null
	install -m 755 $(LLAMA_CACHE)/build/bin/llama-server $(LLAMA_SERVER).tmp
	mv $(LLAMA_SERVER).tmp $(LLAMA_SERVER)
	rm -rf $(LLAMA_CACHE)/src $(LLAMA_CACHE)/build

run: $(STAMP) redis-server
	$(VENV)/bin/gpugate up

test: $(STAMP) redis-server chromium llama-server
	GPUGATE_LLAMA_SERVER=$(LLAMA_SERVER) $(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP) redis-server wrk llama-server
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
