# Two commands matter (README): `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export DS_BUILD_OPS := 0

.PHONY: setup demo test test-fast clean-venv

setup: $(VENV)/.ppow-installed

# torch first and pinned: it resolves to the local CPU wheel; an unpinned torch would pull CUDA builds.
# eagle-llm with --no-deps: its own pins (pydantic 1, protobuf 3.19, accelerate 0.21) break the stack.
$(VENV)/.ppow-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[deepspeed,dev]'
	$(BIN)/pip install -q --no-deps eagle-llm==1.2.1
	$(BIN)/ppow patch apply
	touch $@

demo: setup
	$(BIN)/ppow prepare
	bash scripts/demo.sh

test: setup
	$(BIN)/ppow prepare
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
