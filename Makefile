# Two commands for a fresh machine: `make demo` (the main job on the bundled images) and
# `make test` (the test suite). Both create .venv and install what they need first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,onnx]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/selfscale demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
