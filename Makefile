# Quick start:  make demo   (offline pipeline, 2 DDP processes on CPU)   and   make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCHRUN = $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC)
NPROC ?= 2
export OMP_NUM_THREADS ?= 1

.PHONY: install demo demo-pretrain demo-finetune demo-report test soak experiment experiment-levers experiment-narrow gpu-check clean

$(VENV)/.installed: requirements.txt requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-assets.txt
	touch $@

install: $(VENV)/.installed

demo: install demo-pretrain demo-finetune demo-report

demo-pretrain: install
	$(TORCHRUN) ddp_main.py --config configs/demo_teacher.yaml
	$(TORCHRUN) ddp_main.py --config configs/demo.yaml
	$(TORCHRUN) ddp_main.py --config configs/demo.yaml run_name=demo-nokd loss.alpha_kd=0 loss.alpha_hidden=0

demo-finetune: install
	for run in demo-teacher demo demo-nokd; do \
	  $(TORCHRUN) finetuneit.py --config configs/finetune_tweets.yaml \
	    model=checkpoints/$$run/final run_name=$$run-tweets || exit 1; \
	done

demo-report: install
	OMP_NUM_THREADS=$$(nproc --all) $(PY) compare_benchmarks.py --runs demo-teacher demo demo-nokd demo-teacher-tweets demo-tweets demo-nokd-tweets \
	  --models checkpoints/demo-teacher/final checkpoints/demo/final checkpoints/demo-nokd/final

# The offline study (README "Results"): about 85 minutes on 2 cores; rerun to resume.
experiment: install
	$(PY) experiment.py --config configs/experiment.yaml nproc=$(NPROC)

# The same study plus the lever runs listed under `levers:` in configs/experiment.yaml, then the
# narrow-student arms (configs/experiment_narrow.yaml: pruned vs random init, KD, MiniLM relations).
experiment-levers: install
	$(PY) experiment.py --config configs/experiment.yaml nproc=$(NPROC) run_levers=true
	$(PY) experiment.py --config configs/experiment_narrow.yaml nproc=$(NPROC)

# The narrow-student arms alone: about 100 minutes on 2 cores; rerun to resume.
experiment-narrow: install
	$(PY) experiment.py --config configs/experiment_narrow.yaml nproc=$(NPROC)

# On a CUDA machine: the bert-large bench (compile off/on, MFU), SDPA kernels, a 1-GPU torchrun
# kill-and-resume; logs/gpu-check/gpu_check.json. Without CUDA it prints its plan and exits 0.
gpu-check: install
	$(PY) bench/gpu_check.py

test: install
	$(PY) -m pytest -q tests

# Reliability soak (README "Reliability"): 50 kills and stops under torchrun, at random and inside
# checkpoint and cache writes, then a bitwise comparison; about 6 minutes on 2 idle cores.
soak: install
	$(PY) bench/soak.py

clean:
	rm -rf cache logs/* checkpoints/* plots/*
	touch logs/.gitkeep checkpoints/.gitkeep plots/.gitkeep
