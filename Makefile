# spp_jax: every target runs inside a project-local virtualenv that `make` creates
# and fills from requirements.txt (re-installed whenever requirements.txt changes).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

# ACCEL=cuda12|cuda13|tpu installs JAX's GPU/TPU build (requirements-$(ACCEL).txt: requirements.txt
# plus jax[$(ACCEL)] at the same version) instead of the CPU pins. The venv remembers its ACCEL in
# .venv/.accel, so later make commands keep it. From cpu an accelerator is added in place; leaving
# an accelerator rebuilds .venv (its plugin would otherwise stay and keep JAX on the device).
ACCELS := cpu cuda12 cuda13 tpu
ACCEL  ?= $(or $(shell cat $(VENV)/.accel 2>/dev/null),cpu)
ifeq ($(filter $(ACCEL),$(ACCELS)),)
$(error ACCEL=$(ACCEL) is not one of: $(ACCELS))
endif
REQUIREMENTS := $(if $(filter cpu,$(ACCEL)),requirements.txt,requirements-$(ACCEL).txt)
STAMP  := $(VENV)/.installed$(if $(filter-out cpu,$(ACCEL)),-$(ACCEL))

MODEL    ?= overfeat7
WORKDIR  ?= runs/$(MODEL)
# Optional knobs passed through as config overrides when set on the command line.
OVERRIDES = model=$(MODEL) $(if $(SPP),spp=$(SPP)) $(if $(SIZES),sizes=$(SIZES) size_schedule=$(if $(findstring $(comma),$(SIZES)),multi,single)) \
            $(if $(DATASET),dataset=$(DATASET)) $(if $(DATA_DIR),data_dir=$(DATA_DIR)) $(ARGS)
comma := ,

.PHONY: setup test train eval table2 claims voc_cls caltech101 voc_det bench clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt $(REQUIREMENTS)
	@old=$$(cat $(VENV)/.accel 2>/dev/null || echo cpu); if [ "$$old" != cpu ] && [ "$$old" != $(ACCEL) ]; then \
	    echo "ACCEL changes from $$old to $(ACCEL): rebuilding $(VENV)"; rm -rf $(VENV); fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(REQUIREMENTS)
	rm -f $(VENV)/.installed*
	echo $(ACCEL) > $(VENV)/.accel
	touch $(STAMP)

# The suite in TEST_WORKERS processes (pytest-xdist), one test file per process at a time: most
# tests compile small programs on one core, so 2 processes use a 2-core machine's second core.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# make train MODEL=<zf5|convnet5|overfeat5|overfeat7> [SPP=0] [SIZES=224|180,224] [DATASET=shapes|shapes_wide|imagenet2012]
#            [DATA_DIR=...] [WORKDIR=...] [ARGS="key=value ..."]
train: $(STAMP)
	$(PY) -m experiments.train --workdir $(WORKDIR) $(OVERRIDES)

eval: $(STAMP)
	$(PY) -m experiments.eval --workdir $(WORKDIR) $(ARGS)

# Table 2 of the paper (no SPP / SPP single-size / SPP multi-size) on the current dataset.
table2: $(STAMP)
	$(PY) -m experiments.table2 --workdir runs/$(MODEL)-table2 model=$(MODEL) \
	    $(if $(DATASET),dataset=$(DATASET)) $(if $(DATA_DIR),data_dir=$(DATA_DIR)) $(ARGS)

# The paper's classification claims over seeds: ZF-5 and Overfeat-7 x (no SPP, SPP single-size,
# SPP multi-size) x 3 seeds, tested with 1 crop, 1 full, 10-view and multi-view; resumable run
# by run. -> runs/claims/claims.{md,json,png}
claims: $(STAMP)
	$(PY) -m experiments.claims --workdir runs/claims $(ARGS)

# Transfer classification (Tables 6-8) on a trained workdir's features:
# make voc_cls|caltech101 WORKDIR=runs/zf5 [ARGS="--preset quick|paper key=value ..."]
voc_cls: $(STAMP)
	$(PY) -m experiments.voc_cls checkpoint=$(WORKDIR) $(ARGS)

caltech101: $(STAMP)
	$(PY) -m experiments.caltech101 checkpoint=$(WORKDIR) $(ARGS)

# Detection (Tables 9 and 12) on the embedded data; pretrains ZF-5 in runs/zf5-det-single when no checkpoint is given.
# make voc_det [ARGS="--preset quick|paper --workdir DIR key=value ..."]   (keys: python -m experiments.voc_det --help)
voc_det: $(STAMP)
	$(PY) -m experiments.voc_det $(ARGS)

# Benchmarks against PyTorch/torchvision, in their own venv (torch is never needed by the
# library or its tests). pip, not uv/poetry: on Python 3.11 it takes torch from the local disk.
BENCH_VENV  := .venv-bench
BENCH_PY    := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): requirements.txt requirements-bench.txt
	test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install --quiet --upgrade pip
	$(BENCH_PY) -m pip install --quiet -r requirements-bench.txt
	touch $(BENCH_STAMP)

# make bench [QUICK=1] [DEVICE=gpu] [ARGS="--only 1,2"] -> bench/results/bench{,-quick}.{md,json,png}
bench: $(BENCH_STAMP)
	$(BENCH_PY) -m bench.run $(if $(QUICK),--quick) $(if $(DEVICE),--device $(DEVICE)) $(ARGS)

clean-venv:
	rm -rf $(VENV)
