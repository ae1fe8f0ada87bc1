# Two entry points for a fresh machine (README.md): `make run` and `make test`.
# Both create .venv and install the pinned project into it first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# `make test` also installs the ray extra, so CI runs the Ray tests; `make run` does not need it.
RAY_STAMP := $(VENV)/.ray-stamp

# The offline environment (no telemetry, no hub) is set by the code itself: qprobe/offline.py.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: run test lint venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

$(RAY_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,ray]'
	touch $(RAY_STAMP)

run: $(STAMP)
	$(BIN)/python -m flows.pipeline

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint $(RAY_STAMP)
	$(BIN)/pytest -q
