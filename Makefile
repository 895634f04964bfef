# reelqueue — the two commands of the quick start are `make demo` and `make test`.
# Everything installs into .venv; nothing needs to be installed by hand.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo up test test-fast test-fault test-slow test-gpu test-all lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV) || { scripts/setup-system.sh && $(PYTHON) -m venv --clear $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/reelqueue demo

up: $(STAMP)
	$(BIN)/reelqueue up

# What CI runs: the fast set, then the fault-injection suite (kills, storms, full disks).
test: test-fast test-fault

test-fast: $(STAMP)
	$(BIN)/python -m pytest

test-fault: $(STAMP)
	$(BIN)/python -m pytest -m slow tests/fault

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python scripts/bench_overhead.py

clean:
	rm -rf $(VENV) var inbox *.egg-info
