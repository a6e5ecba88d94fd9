# Two commands a newcomer needs: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: test test-all test-interop venv clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $(STAMP)

# Every test but the interop ones (they need PyTorch + timm, a 5.5 GB install).
test: $(STAMP)
	$(PY) -m pytest -m "not interop" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache
