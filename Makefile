# The two commands a newcomer runs: `make demo` and `make test`. Each sets up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/spikevaediff
TORCH_PIN := torch==2.13.0
DEMO := runs/demo

.PHONY: demo test test-fast bench-binning bench-models clean venv

venv: $(VENV)/.installed

# A machine whose python already has torch (e.g. a CUDA build) keeps it: the venv then sees the
# system site-packages. Otherwise torch is installed first, pinned, so that nothing pulls a
# multi-GB CUDA build; then the project and its test extras.
$(VENV)/.installed: pyproject.toml setup.py core/_wirefast.c
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "using the torch already installed: $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	    $(PYTHON) -m venv $(VENV); \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

demo: venv
	bash scripts/demo.sh "$(DEMO)"

test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

bench-binning: venv
	$(CLI) bench-binning

clean:
	rm -rf $(VENV) runs .pytest_cache
