# One entry point for people and CI. `make repro` and `make test` set up .venv first.
VENV ?= .venv
PYTHON ?= python3
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Nothing is fetched from a model hub at run time: every weight is a local path in params.yaml.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup repro test lint format

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $@

repro: setup
	dvc repro

lint: setup
	ruff check .
	ruff format --check .

# Two workers, a test file each at a time, the longest files first (tests/conftest.py): the
# end-to-end files (a real `dvc repro` apiece) run side by side.
test: lint
	pytest -n 2 --dist loadfile --no-loadscope-reorder

format: setup
	ruff format .
	ruff check --fix .
