# Every target sets itself up on a fresh machine: a virtual environment in .venv with the package installed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= experiments/default.yaml
DATA   ?= data/digits
ARGS   ?=
SWEEP  ?= sweeps/ig_guidance.yaml

.PHONY: help venv data train sweep test test-fast bench clean-venv

help:
	@echo "make train   set up, build the digits shards if needed, train $(CONFIG) (ARGS='--trainer.max_steps 500' to override)"
	@echo "make sweep   run or continue the Optuna study SWEEP=$(SWEEP) (sampling sweeps score the newest run of its base)"
	@echo "make test    set up and run the test suite (slow end-to-end tests included)"
	@echo "make data    build the default data set into $(DATA)"
	@echo "make bench   measure speed and memory targets, write BENCHMARKS.md"

venv: $(VENV)/.installed

# Reinstall when the package's dependencies change. torch comes from the resolver's ranges (pip takes
# a local wheel where the machine has one); nothing here forces another torch build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

data: $(DATA)/meta.json

$(DATA)/meta.json: | venv
	$(BIN)/igdit data build digits $(DATA)

train: venv data
	$(BIN)/igdit fit --config $(CONFIG) $(ARGS)

sweep: venv data
	$(BIN)/igdit sweep $(SWEEP) $(ARGS)

test: venv
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

bench: venv data
	$(BIN)/python -m igdit.bench --out BENCHMARKS.md $(ARGS)

clean-venv:
	rm -rf $(VENV)
