# Two commands a newcomer needs: `make demo` and `make test`. Each creates .venv on first use.
# A Python >= 3.12 (jax 0.12 needs it), found by launch/find_python.sh; or make PYTHON=/path/to/python3.13.
PYTHON ?= $(shell bash launch/find_python.sh 2> /dev/null)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
export TF_CPP_MIN_LOG_LEVEL ?= 2
# TCMalloc when installed (launch/preload_tcmalloc.sh says why): faster steps and compiles.
export LD_PRELOAD := $(shell bash -c 'source launch/preload_tcmalloc.sh; echo "$$LD_PRELOAD"')

DEMO_DATA := demo_data
DEMO_WORKDIR := workdirs/demo
DEMO_EXPORT := $(DEMO_WORKDIR)/export/teacher.safetensors

.PHONY: demo test test-long test-interop fuzz venv clean

venv: $(STAMP)

# A venv of PYTHON with the pinned requirements and the project installed editable; a venv of an
# older Python (made before the move to 3.12+) is made anew. $(1): the venv; $(2): extra pip args.
# requirements-test.txt brings requirements-beam.txt: the tests run conversions on Apache Beam.
define make_venv
	@test -n "$(PYTHON)" || { bash launch/find_python.sh; exit 1; }
	$(1)/bin/python -c 'import sys; assert sys.version_info >= (3, 12)' 2> /dev/null || { rm -rf $(1) && $(PYTHON) -m venv $(1); }
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(if $(2),$(1)/bin/python -m pip install --quiet $(2))
	$(1)/bin/python -m pip install --quiet -r requirements-test.txt
	$(1)/bin/python -m pip install --quiet --no-deps -e .
	touch $(1)/.installed
endef

$(STAMP): requirements.txt requirements-beam.txt requirements-test.txt pyproject.toml
	$(call make_venv,$(VENV),)

# The main job end to end on built-in synthetic data: shards for all seven modalities,
# a few minutes of pretraining of a tiny ViT on the CPU, then a linear probe per modality, and
# the teacher exported as timm-named safetensors (the lines printed load it in timm).
demo: $(STAMP)
	$(PY) -m data_pipelines.convert demo --out $(DEMO_DATA) --images-per-modality 512 --size 64
	$(PY) -m mermed_jax.pretrain --config=configs/demo_cpu.py --workdir=$(DEMO_WORKDIR)
	$(PY) -m mermed_jax.evaluate --config=configs/eval_demo.py --workdir=$(DEMO_WORKDIR)
	$(PY) -m mermed_jax.export --workdir=$(DEMO_WORKDIR) --format=safetensors --out=$(DEMO_EXPORT)
	@echo "TensorBoard logs: $(DEMO_WORKDIR)  (tensorboard --logdir $(DEMO_WORKDIR))"
	@echo "The teacher in timm (its inputs: pixels / 255 normalised by the JSON's per-modality \"normalization\"):"
	@echo '  import json, safetensors.torch, timm'
	@echo '  spec = json.load(open("$(DEMO_EXPORT:.safetensors=.json)"))["timm"]'
	@echo '  model = timm.create_model(spec["model_name"], num_classes=0) if spec["model_name"] else timm.models.VisionTransformer(**spec["kwargs"])'
	@echo '  model.load_state_dict(safetensors.torch.load_file("$(DEMO_EXPORT)"))'

# Every test but the interop ones (they need PyTorch + timm, an 8 GB install) and the long
# rehearsals (`long` marker): within 15 minutes on 2 cores.
test: $(STAMP)
	$(PY) -m pytest -m "not interop and not long" $(PYTEST_ARGS)

# The long rehearsals (`long` marker: end-to-end runs of minutes each); CI runs them after `make test`,
# the two together within 45 minutes on 2 cores. pytest's exit 5 (none selected) counts as a pass.
test-long: $(STAMP)
	$(PY) -m pytest -m "long and not interop" $(PYTEST_ARGS) || test $$? -eq 5

# The fuzz tests (`-m fuzz`) with many more examples than `make test` gives them, new inputs each run
# (hypothesis prints the seed of a failure: rerun with PYTEST_ARGS=--hypothesis-seed=N), and 40
# kill -9 points of checkpoint saving instead of 4.
FUZZ_EXAMPLES ?= 2000
fuzz: $(STAMP)
	MERMED_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) MERMED_FAULT_KILLS=40 MERMED_FAULT_SEED=$$RANDOM \
		$(PY) -m pytest -m "fuzz and not interop" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache $(DEMO_DATA) $(DEMO_WORKDIR)

# PyTorch/timm interop tests (`-m interop`), in their own venv: the project's Python (3.12+) has no
# CPU build of torch on PyPI, so this is PyPI's torch 2.14.1 with torchvision 0.29.1 (a CUDA build
# that runs on the CPU) and timm: about 8 GB and 6 minutes to download, which the runtime never needs.
INTEROP_VENV := .venv-interop
INTEROP_PY := $(INTEROP_VENV)/bin/python
INTEROP_STAMP := $(INTEROP_VENV)/.installed

# Triton (torch's GPU compiler, pulled in by the CUDA build) is removed: its LLVM segfaults at import
# once TensorFlow and OpenCV are loaded, as they are when pytest collects the suite; the CPU
# tests never use it.
$(INTEROP_STAMP): requirements.txt requirements-beam.txt requirements-test.txt pyproject.toml
	$(call make_venv,$(INTEROP_VENV),torch==2.14.1 torchvision==0.29.1 timm==1.0.31)
	$(INTEROP_PY) -m pip uninstall --quiet --yes triton

test-interop: $(INTEROP_STAMP)
	$(INTEROP_PY) -m pytest -m interop $(PYTEST_ARGS)
