# Set-up and the two jobs of the README. Everything lives in .venv; nothing is installed globally
# except Debian's chromium for the browser tests (when missing and when run as root).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (this spec resolves to a local CPU wheel on the lab machines; on a GPU
# machine, install the CUDA build of your choice into .venv first and it is kept).
TORCH_SPEC ?= torch==2.13.0
PRESET ?= cpu

.PHONY: setup setup-dev quickstart test browser-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	$(BIN)/lablib kernel

setup-dev: setup
	$(BIN)/pip install -q -e ".[dev]"

quickstart: setup
	$(BIN)/lablib run notebooks/00_quickstart.ipynb --preset $(PRESET)

browser-deps:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

test: setup-dev browser-deps
	LABLIB_PRESET=smoke $(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider
