# `make demo` and `make test` work on a machine with only Python 3.11, pip, gcc and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/ocula: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the local CPU wheel. Any looser spec would pull the multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,coreml,serve,index]"
	touch $@

install: $(BIN)/ocula

demo: install
	$(BIN)/ocula demo

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs build src/*.egg-info
