# Everything runs from the project's virtual environment (.venv), made from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_IMAGE ?= jobs/media/beach.jpg
DEMO_PROMPT ?= Describe this image in one sentence.

.PHONY: install install-demo install-size docs wheel test lint demo ask-demo screenshots llama-cpp llama-server bench-peers bench clean

# Two install sets in one venv, each with its stamp: the demo's (`.[demo]`: the CPU runtime, the exporter, video
# decoders, the gallery) and the development set on top (`.[dev]`: tests, lint, torch for the oracle, Ray, the
# browser driver), which holds the demo's too.
DEMO_STAMP := $(VENV)/installed-demo
DEV_STAMP := $(VENV)/installed-dev

$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[demo]'
	touch $@

$(DEV_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(DEMO_STAMP)

install-demo: $(DEMO_STAMP)  ## the venv with what the demo runs: onnxruntime, the exporter, video decoders, the gallery

install: $(DEV_STAMP)  ## the venv with everything: the demo's set plus the test suite's and lint's tools

install-size: install  ## site-packages size of a fresh install per extra set (temporary venvs outside the checkout)
	$(BIN)/python bench/install_size.py

test: install  ## the whole test suite (oracle comparisons against transformers included)
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

docs: install  ## the documentation site in site/ (mkdocs --strict), its configuration reference regenerated first
	$(BIN)/python docs/hooks/config_reference.py
	$(BIN)/mkdocs build --strict

wheel: install  ## the wheel and sdist in dist/, installed into a fresh venv outside the checkout and run there
	.ci/wheel

models/tiny-hf/config.json: | install-demo
	$(BIN)/vlbatch make-model --preset tiny models/tiny-hf

models/tiny-onnx/manifest.json: models/tiny-hf/config.json
	$(BIN)/vlbatch export models/tiny-hf models/tiny-onnx

jobs/media/clip.mp4: | install-demo
	$(BIN)/python tests/synthetic.py jobs/media

demo: models/tiny-onnx/manifest.json jobs/media/clip.mp4  ## the example jobs on the tiny random-weight model
	$(BIN)/vlbatch submit jobs/examples/*.yaml
	$(BIN)/vlbatch run
	$(BIN)/vlbatch results
	$(BIN)/vlbatch gallery jobs/gallery   # open jobs/gallery/index.html in a browser

ask-demo: models/tiny-onnx/manifest.json jobs/media/clip.mp4  ## one question straight to the tiny model
	$(BIN)/vlbatch ask -p "$(DEMO_PROMPT)" --max-new-tokens 48 $(DEMO_IMAGE)

screenshots: install  ## the docs' screenshots of serve and gallery, in headless Debian chromium (apt-get install chromium)
	$(BIN)/python tests/browser_shots.py docs/screenshots

# llama.cpp with every CPU variant as its own library, the best one picked at run time (ggml's CPU scoring):
# the same build runs on AVX2-only, AVX-512 (with or without VNNI/BF16), AVX-VNNI and AMX x86-64 CPUs and on
# arm64. `make bench LLAMA_CMAKE_ARGS="-DGGML_NATIVE=ON"` builds for this machine only. The variants (and
# headers) go into the package's own folder, llama_cpp/lib, not site-packages/bin.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON \
	-DCMAKE_INSTALL_BINDIR=llama_cpp/lib -DCMAKE_INSTALL_INCLUDEDIR=llama_cpp/include \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAVA_BUILD=ON

# The pinned llama-cpp-python sdist, unpacked under .venv/llama-src: its vendored llama.cpp is what the build
# compiles, and its converter (convert_hf_to_gguf.py --mmproj, with the vendored gguf-py) writes the image
# projector for bench/peer_mtmd.py.
LLAMA_PIN := $(shell grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
LLAMA_SRC := $(VENV)/llama-src/llama_cpp_python-$(lastword $(subst ==, ,$(LLAMA_PIN)))
LLAMA_JOBS ?= 2

$(LLAMA_SRC)/vendor/llama.cpp/convert_hf_to_gguf.py: pyproject.toml | install
	mkdir -p $(VENV)/llama-src
	$(BIN)/pip download --quiet --no-deps --no-binary :all: "$(LLAMA_PIN)" -d $(VENV)/llama-src
	tar xzf $(LLAMA_SRC).tar.gz -C $(VENV)/llama-src
	touch $@

# llama.cpp's own OpenAI-compatible server from the same source, the image projector included (mtmd), for
# `model.backend: openai` and tests/test_llama_server.py: one portable CPU build (AVX2/FMA/F16C on x86-64, no
# -march=native, no per-CPU variants), linked statically (the system's libstdc++/libgomp aside) so
# .venv/llama-server/bin/llama-server runs from there; no TLS (loopback and LAN use; model downloads off) and no
# web page (no npm, no download of the prebuilt one). Only the llama-server target is compiled, under nice with
# $(LLAMA_JOBS) jobs (~5 min on 2 cores); it is rebuilt when the sdist is unpacked again or the flags change
# (cmake then recompiles only what changed).
LLAMA_SERVER_DIR := $(VENV)/llama-server
LLAMA_SERVER := $(LLAMA_SERVER_DIR)/bin/llama-server
LLAMA_SERVER_CMAKE_ARGS ?= -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF \
	-DGGML_BACKEND_DL=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF \
	-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
	-DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON

# rewritten only when the flags differ, so the binary rebuilds on a change of LLAMA_SERVER_CMAKE_ARGS alone
$(LLAMA_SERVER_DIR)/cmake-args: FORCE
	@mkdir -p $(LLAMA_SERVER_DIR)
	@if [ "$$(cat $@ 2>/dev/null)" != "$(LLAMA_SERVER_CMAKE_ARGS)" ]; then echo "$(LLAMA_SERVER_CMAKE_ARGS)" > $@; fi

$(LLAMA_SERVER): $(LLAMA_SRC)/vendor/llama.cpp/convert_hf_to_gguf.py $(LLAMA_SERVER_DIR)/cmake-args
	cmake -S $(LLAMA_SRC)/vendor/llama.cpp -B $(LLAMA_SERVER_DIR) $(LLAMA_SERVER_CMAKE_ARGS)
	nice -n 10 cmake --build $(LLAMA_SERVER_DIR) --target llama-server -j $(LLAMA_JOBS)
	touch $@

llama-server: $(LLAMA_SERVER)  ## llama.cpp's llama-server (images through mtmd) in .venv/llama-server/bin

FORCE:

# llama-cpp-python from that sdist with its mtmd library (libmtmd, the image pipeline: LLAVA_BUILD=ON) next to
# libllama in llama_cpp/lib; pip keeps an installed llama-cpp-python whatever CMAKE_ARGS say, so it rebuilds
# when the flags differ from its build's (nice, $(LLAMA_JOBS) jobs: ~25 min on 2 cores); llama-server comes with it
llama-cpp: $(LLAMA_SRC)/vendor/llama.cpp/convert_hf_to_gguf.py llama-server  ## llama-cpp-python (text and mtmd) and llama-server from the vendored llama.cpp
	@if [ "$$(cat $(VENV)/llama-cmake-args 2>/dev/null)" != "$(LLAMA_CMAKE_ARGS)" ]; then \
		echo "building llama-cpp-python with: $(LLAMA_CMAKE_ARGS)"; \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(LLAMA_JOBS) nice -n 10 \
			$(BIN)/pip install --quiet --force-reinstall --no-deps --no-cache-dir $(LLAMA_SRC).tar.gz && \
		echo "$(LLAMA_CMAKE_ARGS)" > $(VENV)/llama-cmake-args; \
	fi

bench-peers: install llama-cpp  ## the benchmark's peers: transformers, and llama-cpp-python with mtmd (LLAMA_CMAKE_ARGS)
	$(BIN)/pip install --quiet -e '.[bench]'

bench: bench-peers  ## real-shape speed table with the transformers and llama.cpp peers (~40 min); exits 1 if a peer fails
	$(BIN)/python bench/run_bench.py --weights int4+int8 int4 fp32 --peers transformers llamacpp mtmd --json bench.json

clean:
	rm -rf models site dist .pytest_cache jobs/.slots jobs/media jobs/inbox jobs/work jobs/done jobs/failed jobs/rejected jobs/gallery vlbatch.db*
