# The two commands of the README: `make demo` (the main job on the embedded default archive)
# and `make test` (the style checks and the test suite). Both set up .venv first when it is
# missing or stale.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch for machines without a GPU. On a CUDA cluster: make TORCH=torch
TORCH  ?= torch==2.13.0
CORES  ?= 2
BIN     = $(VENV)/bin

.PHONY: setup test demo clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

# Style first (seconds), then the suite (minutes).
test: setup
	$(BIN)/ruff check deepdark tests benchmarks docs
	$(BIN)/ruff format --check deepdark tests benchmarks docs
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/pytest

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores $(CORES) --profile workflow/profiles/local

clean-demo:
	rm -rf results resources logs
