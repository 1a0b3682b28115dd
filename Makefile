# hd - Hybrid Distillation toolkit. `make test` and `make demo` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test lint clean

install: $(STAMP)

# torch/torchvision pinned to the releases this machine installs from local disk; pyproject admits them.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check hdcli tests

clean:
	rm -rf $(VENV) build *.egg-info hdcli/*.egg-info .pytest_cache runs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
