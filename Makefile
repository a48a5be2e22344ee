# Everything runs from the project's virtual environment (.venv), made from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_IMAGE ?= jobs/media/beach.jpg
DEMO_PROMPT ?= Describe this image in one sentence.

.PHONY: install install-size test lint demo ask-demo screenshots bench clean

$(BIN)/vlbatch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/vlbatch  ## the venv with vlbatch, onnxruntime, video decoders and the test tools

install-size: install  ## site-packages size of a fresh install per extra set (temporary venvs outside the checkout)
	$(BIN)/python bench/install_size.py

test: install  ## the whole test suite (oracle comparisons against transformers included)
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

models/tiny-hf/config.json: | install
	$(BIN)/vlbatch make-model --preset tiny models/tiny-hf

models/tiny-onnx/manifest.json: models/tiny-hf/config.json
	$(BIN)/vlbatch export models/tiny-hf models/tiny-onnx

jobs/media/clip.mp4: | install
	$(BIN)/python tests/synthetic.py jobs/media

demo: models/tiny-onnx/manifest.json jobs/media/clip.mp4  ## the example jobs on the tiny random-weight model
	$(BIN)/vlbatch submit jobs/examples/*.yaml
	$(BIN)/vlbatch run
	$(BIN)/vlbatch results
	$(BIN)/vlbatch gallery jobs/gallery   # open jobs/gallery/index.html in a browser

ask-demo: models/tiny-onnx/manifest.json jobs/media/clip.mp4  ## one question straight to the tiny model
	$(BIN)/vlbatch ask -p "$(DEMO_PROMPT)" --max-new-tokens 48 $(DEMO_IMAGE)

screenshots: install  ## the README's screenshots of serve and gallery, in headless Debian chromium (apt-get install chromium)
	$(BIN)/python tests/browser_shots.py docs/screenshots

# llama.cpp built for AVX2/AVX512 without AMX: its AMX buffers crash on multi-token batches on AMX CPUs
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX_VNNI=ON -DLLAMA_CURL=OFF

bench: install  ## real-shape speed table with the transformers and llama.cpp peers (needs .[bench], ~30 min)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run_bench.py --weights int4 fp32 --peers transformers llamacpp --json bench.json

clean:
	rm -rf models .pytest_cache jobs/.slots jobs/media jobs/inbox jobs/work jobs/done jobs/failed jobs/rejected jobs/gallery vlbatch.db*
