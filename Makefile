# Two commands a newcomer needs: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
export TF_CPP_MIN_LOG_LEVEL ?= 2
# TCMalloc when installed (launch/preload_tcmalloc.sh says why): faster steps and compiles.
export LD_PRELOAD := $(shell bash -c 'source launch/preload_tcmalloc.sh; echo "$$LD_PRELOAD"')

DEMO_DATA := demo_data
DEMO_WORKDIR := workdirs/demo

.PHONY: demo test test-interop fuzz venv clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $(STAMP)

# The main job end to end on built-in synthetic data: shards for all seven modalities,
# a few minutes of pretraining of a tiny ViT on the CPU, then a linear probe per modality.
demo: $(STAMP)
	$(PY) -m data_pipelines.convert demo --out $(DEMO_DATA) --images-per-modality 512 --size 64
	$(PY) -m mermed_jax.pretrain --config=configs/demo_cpu.py --workdir=$(DEMO_WORKDIR)
	$(PY) -m mermed_jax.evaluate --config=configs/eval_demo.py --workdir=$(DEMO_WORKDIR)
	@echo "TensorBoard logs: $(DEMO_WORKDIR)  (tensorboard --logdir $(DEMO_WORKDIR))"

# Every test but the interop ones (they need PyTorch + timm, a 5.5 GB install).
test: $(STAMP)
	$(PY) -m pytest -m "not interop" $(PYTEST_ARGS)

# The fuzz tests (`-m fuzz`) with many more examples than `make test` gives them, new inputs each run
# (hypothesis prints the seed of a failure: rerun with PYTEST_ARGS=--hypothesis-seed=N), and 40
# kill -9 points of checkpoint saving instead of 4.
FUZZ_EXAMPLES ?= 2000
fuzz: $(STAMP)
	MERMED_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) MERMED_FAULT_KILLS=40 MERMED_FAULT_SEED=$$RANDOM \
		$(PY) -m pytest -m "fuzz and not interop" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache $(DEMO_DATA) $(DEMO_WORKDIR)

# PyTorch/timm interop tests (`-m interop`), in their own venv: torch 2.14.1 with torchvision and
# timm is a 5.5 GB install that the runtime never needs.
INTEROP_VENV := .venv-interop
INTEROP_PY := $(INTEROP_VENV)/bin/python
INTEROP_STAMP := $(INTEROP_VENV)/.installed

$(INTEROP_STAMP): requirements.txt requirements-test.txt
	test -x $(INTEROP_PY) || $(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_PY) -m pip install --quiet --upgrade pip
	$(INTEROP_PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1 timm
	$(INTEROP_PY) -m pip install --quiet -r requirements-test.txt
	touch $(INTEROP_STAMP)

test-interop: $(INTEROP_STAMP)
	$(INTEROP_PY) -m pytest -m interop $(PYTEST_ARGS)
