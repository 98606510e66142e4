# Set-up and the two jobs of the README. Everything lives in .venv; nothing is installed globally
# except Debian's chromium for the browser tests (when missing and when run as root).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# Where pip looks for torch. Empty: the configured index (PyPI), which is what the lab machines
# reach and where they find a CPU wheel. On an ordinary Linux machine PyPI's torch is the
# multi-GB CUDA build, so CPU set-ups there say `make setup TORCH_INDEX=$(TORCH_CPU_INDEX)`.
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
# The GPU route (`make setup-gpu`): a CUDA build of torch, replacing a CPU one already in .venv.
# Empty: PyPI's Linux wheel (CUDA 12); or name one of PyTorch's indexes, e.g. .../whl/cu128.
TORCH_GPU_INDEX ?=
PRESET ?= cpu

torch_index = $(if $(1),--index-url $(1),)

.PHONY: setup setup-gpu setup-dev quickstart test browser-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(call torch_index,$(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	$(BIN)/lablib kernel

setup-gpu: $(BIN)/python
	$(BIN)/python -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null || \
		$(BIN)/pip install -q --force-reinstall --no-deps $(call torch_index,$(TORCH_GPU_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install -q $(call torch_index,$(TORCH_GPU_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	$(BIN)/lablib kernel
	$(BIN)/python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPUs', torch.cuda.device_count())"

setup-dev: setup
	$(BIN)/pip install -q -e ".[dev]"

quickstart: setup
	$(BIN)/lablib run notebooks/00_quickstart.ipynb --preset $(PRESET)

browser-deps:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

test: setup-dev browser-deps
	LABLIB_PRESET=smoke $(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider
