# The front door. Two commands matter on a fresh machine:
#   make book   builds the book (sets up .venv, executes every chapter, prints where the HTML is)
#   make test   runs every test: lint, unit tests, nbval on every chapter (FAST), the book build (FAST), browser tests
PYTHON      ?= python3
VENV        ?= .venv
# Pins torch to the local CPU wheel on machines like CI's; use CONSTRAINTS=/dev/null to keep a torch you already have.
CONSTRAINTS ?= ci/constraints.txt
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.iddpm-installed

.PHONY: install lint format unit nbtest book book-fast browser-deps browser test bench clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/nbstripout --verify book/*.ipynb

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/nbstripout book/*.ipynb

unit: install
	$(BIN)/python -m pytest tests --ignore=tests/browser -q

nbtest: install
	IDDPM_FAST=1 $(BIN)/python -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=900 book -q

book: install
	rm -rf _build/html _build/jupyter_execute
	$(BIN)/jupyter-book build -W --keep-going --all .
	@echo "The book is at $(CURDIR)/_build/html/index.html"

book-fast:
	IDDPM_FAST=1 $(MAKE) book

browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium; \
	  else sudo apt-get update -q && sudo apt-get install -y -q chromium; fi; }

browser: install browser-deps
	$(BIN)/python -m pytest tests/browser -q

test: lint unit nbtest book-fast browser

bench: install
	$(BIN)/python -m iddpm bench --preset tiny

clean:
	rm -rf _build .pytest_cache .ruff_cache
