# Every target sets itself up on a fresh machine: a virtual environment in .venv with the package installed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= experiments/default.yaml
DATA   ?= data/digits
SOURCE ?= digits
ARGS   ?=
SWEEP  ?= sweeps/ig_guidance.yaml
STUDY  ?= experiments/studies/reproduce.yaml
QUICK  ?=
DATA_ARGS ?=

# Several GPUs or nodes: `make train CONFIG=... NODES=4 GPUS=8 NODE_RANK=<i> MASTER_ADDR=<host of rank 0>` on every
# node starts torchrun, which starts GPUS processes there; Lightning's DDP runs one model across all of them.
# Without NODES and GPUS, `make train` is one plain process (the laptop default).
NODES       ?=
GPUS        ?=
NODE_RANK   ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
ifneq ($(strip $(NODES)$(GPUS)),)
LAUNCH    := $(BIN)/python -m torch.distributed.run --nnodes $(or $(NODES),1) --nproc_per_node $(or $(GPUS),1) \
             --node_rank $(NODE_RANK) --master_addr $(MASTER_ADDR) --master_port $(MASTER_PORT) -m igdit.cli
DIST_ARGS := --trainer.num_nodes $(or $(NODES),1) --trainer.devices $(or $(GPUS),1) --trainer.strategy ddp
else
LAUNCH    := $(BIN)/igdit
DIST_ARGS :=
endif
# The default experiment and the other *_digits.yaml ones train on the digits shards `make data` builds; the
# paper configs name their own.
TRAIN_DATA := $(if $(filter experiments/default.yaml experiments/%_digits.yaml,$(CONFIG)),data,)

.PHONY: help venv data train sweep reproduce test test-fast test-order bench bench-gpu clean-venv

help:
	@echo "make train   set up, build the digits shards if needed, train $(CONFIG) (ARGS='--trainer.max_steps 500' to override)"
	@echo "             NODES=4 GPUS=8 NODE_RANK=<i> MASTER_ADDR=<host> [MASTER_PORT=29500]: torchrun + DDP on every node"
	@echo "make sweep   run or continue the Optuna study SWEEP=$(SWEEP) (sampling sweeps score the newest run of its base)"
	@echo "make reproduce  run the study $(STUDY) (QUICK=1: a first look in < 20 min), write REPRODUCTION.md"
	@echo "make test    set up and run the test suite (slow end-to-end tests included)"
	@echo "make test-order  the suite shuffled across files (SEED=<n> replays an order), then each test file alone"
	@echo "make data    build $(SOURCE) into $(DATA) (DATA_ARGS='--encoder sd-vae-ft-ema --resolution 256'; GPUS=8 splits it)"
	@echo "make bench   measure speed and memory targets, write BENCHMARKS.md"
	@echo "make bench-gpu  on a GPU machine: paper-scale training, sampling, FID and data in < 8 min, BENCHMARKS.md's GPU section"

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
	$(LAUNCH) data build $(SOURCE) $(DATA) $(DATA_ARGS)

train: venv $(TRAIN_DATA)
	$(LAUNCH) fit --config $(CONFIG) $(DIST_ARGS) $(ARGS)

sweep: venv data
	$(BIN)/igdit sweep $(SWEEP) $(ARGS)

reproduce: venv data
	$(BIN)/igdit reproduce $(STUDY) $(if $(QUICK),--quick,) $(ARGS)

test: venv
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

# No test may depend on another having run first: the whole suite in one shuffled order across files (make prints
# the seed it drew; SEED=<n> replays it), then each test file in a process of its own. About twice `make test`'s time.
test-order: venv
	@seed=$${SEED:-$$(date +%s)}; echo "== the suite shuffled with seed $$seed (make test-order SEED=$$seed replays it)"; \
	$(BIN)/python -m pytest -q --random-order-bucket=global --random-order-seed=$$seed $(ARGS)
	@failed=""; for f in tests/test_*.py; do echo "== $$f alone"; $(BIN)/python -m pytest -q $$f $(ARGS) || \
	    failed="$$failed $$f"; done; test -z "$$failed" || { echo "failed when run alone:$$failed"; exit 1; }

bench: venv data
	$(BIN)/python -m igdit.bench --out BENCHMARKS.md $(ARGS)

# One accelerator, one command, under 8 minutes on an H100/H200 (ARGS='--budget 300' for less; '--device cpu --tiny'
# checks the script on a CPU). Needs no data: the models train on random latents and stream generated shards.
bench-gpu: venv
	$(BIN)/python -m igdit.bench --gpu --out BENCHMARKS.md $(ARGS)

clean-venv:
	rm -rf $(VENV)
