# Thin calls of the `arcface` CLI. Every target depends on setup, so any of them works first.
VENV     ?= .venv
PYTHON   ?= python3
ARCFACE  := $(VENV)/bin/arcface
DEMO_RAW ?= data/demo/raw
FORMAT   ?= vggface2
INPUT    ?= $(DEMO_RAW)
REFINE_OUT ?= data/demo/refined
# What training reads: the refined (stage-2) dataset.
CLEAN_OUT ?= $(REFINE_OUT)/stage2

TRAIN_CONFIG ?= configs/demo-train.toml
MODEL    ?= arcface
VERSION  ?= latest
MODEL_URI ?= models:/$(MODEL)@champion

.PHONY: setup run train clean-data stage1 demo-data services-up services-down services-status evaluate promote rollback rehearsal test test-all test-gpu bench-core bench-gpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade --quiet pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[dev,onnx]'
	$(ARCFACE) fetch-weights
	touch $@

# The main job on its embedded default: demo data -> clean-data -> train (ray job submit) ->
# promote, with progress and a summary; each phase's full output in .arcface/logs/.
run: setup
	@$(ARCFACE) run --input $(INPUT) --format $(FORMAT) --out $(REFINE_OUT) --config $(TRAIN_CONFIG)

# The whole refinement (the paper's loop): stage 1 on Dask -> bootstrap model on Ray Train
# -> stage 2 on Ray; on the demo raw data unless INPUT/FORMAT say otherwise. The bootstrap
# model follows TRAIN_CONFIG's [train] recipe for denoise.bootstrap_epochs epochs.
clean-data: setup $(if $(filter $(DEMO_RAW),$(INPUT)),demo-data)
	$(ARCFACE) clean-data --input $(INPUT) --format $(FORMAT) --out $(REFINE_OUT) --config $(TRAIN_CONFIG)

# Stage 1 alone.
stage1: setup $(if $(filter $(DEMO_RAW),$(INPUT)),demo-data)
	$(ARCFACE) stage1 --input $(INPUT) --format $(FORMAT) --out $(REFINE_OUT)/stage1

$(CLEAN_OUT)/manifest.json:
	$(MAKE) clean-data

# Starts a local Ray head (and MLflow server) unless RAY_ADDRESS (MLFLOW_TRACKING_URI) is
# set, submits `arcface train` as a Ray job, and follows its logs.
train: setup $(CLEAN_OUT)/manifest.json
	$(ARCFACE) submit train --data $(CLEAN_OUT) --config $(TRAIN_CONFIG)

# Verification + identification of a model on the sets that come with the data.
evaluate: setup
	$(ARCFACE) evaluate --model $(MODEL_URI) --data $(CLEAN_OUT) $(if $(PAIRS),--pairs $(PAIRS))

# The champion alias moves only if VERSION beats it (PAIRS: evaluate both on these sets now).
promote: setup
	$(ARCFACE) promote --name $(MODEL) --version $(VERSION) $(if $(PAIRS),--pairs $(PAIRS))

rollback: setup
	$(ARCFACE) rollback --name $(MODEL)

$(DEMO_RAW)/ground_truth.json: | setup
	$(ARCFACE) demo-data --out $(DEMO_RAW)

demo-data: $(DEMO_RAW)/ground_truth.json

services-up: setup
	$(ARCFACE) services up

services-down: setup
	$(ARCFACE) services down

services-status: setup
	$(ARCFACE) services status

# The cluster runbook (infra/README.md) on one machine, against a cluster that cannot see this
# checkout (Ray head + 2nd node, Dask, MLflow from the project's wheel; S3 shared). Root.
rehearsal: setup
	infra/rehearsal/shared_nothing.sh

# The 15 slowest tests close the report: the suite must stay well inside 30 minutes on 2 cores.
test: setup
	$(VENV)/bin/pytest --durations=15

# Slow tests too (the default run skips them).
test-all: setup
	$(VENV)/bin/pytest -m "not gpu"

bench-core: setup
	$(VENV)/bin/python benchmarks/bench_classification_layer.py

# On a machine with CUDA: the GPU cases of the suite, and the step/detector benchmark.
test-gpu: setup
	$(VENV)/bin/pytest -m gpu

bench-gpu: setup
	$(VENV)/bin/python benchmarks/bench_gpu.py

clean:
	rm -rf data .arcface
