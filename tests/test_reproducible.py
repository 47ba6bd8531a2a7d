"""Reproducible outputs: the same input files, recipe, seed and qtool version give byte-identical
outputs across runs and thread counts (1 and 2 threads), for every format on tiny models (on SmolLM2, calibration
methods can differ between thread counts: float32 matmul sums in a thread-dependent order; README); the provenance names
the input hashes, versions and recipe."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUNS = {
    "rtn-compressed-tensors": ["-b", "4", "-g", "32", "-f", "compressed-tensors"],
    "rtn-asym-gptq": ["-b", "4", "-g", "32", "--asym", "-f", "gptq"],
    "gptq-gptq": ["-m", "gptq", "-b", "4", "-g", "32", "-f", "gptq", "--samples", "4", "--seq-len", "64"],
    "gptq-compressed-tensors": ["-m", "gptq", "-b", "4", "-g", "32", "--act-order", "--static-groups", "--samples", "4", "--seq-len", "64"],
}


def _digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {p.name if path.is_file() else p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _quantize(model: Path, out: Path, args: list[str], threads: int, dataset: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if "-m" in args:
        args = [*args, "--dataset", str(dataset)]
    r = subprocess.run([sys.executable, "-m", "qtool", "quantize", str(model), *args, "-o", str(out), "-q"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return _digest(out)


@pytest.mark.parametrize("name", list(RUNS))
def test_same_bytes_across_runs_and_thread_counts(name, tiny_byte_llama, wiki_sample, tmp_path):
    a = _quantize(tiny_byte_llama, tmp_path / "1" / "q", RUNS[name], 1, wiki_sample)  # same output name: the card names it
    b = _quantize(tiny_byte_llama, tmp_path / "2" / "q", RUNS[name], 2, wiki_sample)
    assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert "model.safetensors" in a


def test_gguf_same_bytes_across_thread_counts(tmp_path, smollm2_dir):
    from tiny_models import build_tiny_with_tokenizer_of

    src = build_tiny_with_tokenizer_of(tmp_path / "src", smollm2_dir)
    a = _quantize(src, tmp_path / "1" / "m.gguf", ["-f", "gguf", "-t", "Q4_K_M"], 1, Path())
    b = _quantize(src, tmp_path / "2" / "m.gguf", ["-f", "gguf", "-t", "Q4_K_M"], 2, Path())
    assert a == b


def test_provenance_names_inputs_versions_and_recipe(tiny_byte_llama, tmp_path):
    _quantize(tiny_byte_llama, tmp_path / "q", RUNS["rtn-compressed-tensors"], 2, Path())
    blob = json.dumps(json.loads((tmp_path / "q" / "qtool.json").read_text()))
    st = hashlib.sha256((tiny_byte_llama / "model.safetensors").read_bytes()).hexdigest()
    assert st in blob  # the input's sha256
    assert '"qtool"' in blob and '"torch"' in blob and '"transformers"' in blob
    assert '"group_size": 32' in blob
