# Everything runs from the project's virtual environment (.venv), made from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_IMAGE ?= $(firstword $(wildcard ../shared/media/*.jpg ../shared/media/*.png))
DEMO_PROMPT ?= Describe this image in one sentence.

.PHONY: install test lint demo clean

$(BIN)/vlbatch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/vlbatch  ## the venv with vlbatch, onnxruntime, video decoders and the test tools

test: install  ## the whole test suite (oracle comparisons against transformers included)
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

models/tiny-hf/config.json: | install
	$(BIN)/vlbatch make-model --preset tiny models/tiny-hf

models/tiny-onnx/manifest.json: models/tiny-hf/config.json
	$(BIN)/vlbatch export models/tiny-hf models/tiny-onnx

demo: models/tiny-onnx/manifest.json  ## answer a question with the tiny random-weight model
	$(BIN)/vlbatch ask -p "$(DEMO_PROMPT)" --max-new-tokens 48 $(DEMO_IMAGE)

clean:
	rm -rf models .pytest_cache
