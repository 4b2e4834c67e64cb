# Sputnik: `make demo` runs the main job, `make test` runs the test suite. Both create or reuse
# the virtual environment in .venv and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Where the CPU build of PyTorch comes from on machines without a CUDA GPU.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@# Install torch first: with no CUDA GPU, the CPU build (a bare `torch` would pull CUDA wheels).
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "setup: torch $$($(PY) -c 'import torch; print(torch.__version__)') already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "setup: CUDA GPU found, installing torch==$(TORCH_VERSION)"; \
		$(PY) -m pip install -q torch==$(TORCH_VERSION); \
	else \
		echo "setup: no CUDA GPU, installing the CPU build of torch==$(TORCH_VERSION)"; \
		$(PY) -m pip install -q --timeout 20 --retries 0 torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX) 2>/dev/null \
		|| $(PY) -m pip install -q torch==$(TORCH_VERSION); \
	fi
	@echo "setup: installing sputnik and its dependencies into $(VENV)"
	@$(PY) -m pip install -q -e ".[dev]"
	@touch $@

demo: setup
	$(VENV)/bin/sputnik demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
