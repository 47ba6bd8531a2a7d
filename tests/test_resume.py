"""`qtool quantize ... --resume`: a calibration run checkpoints after every block (beside the
output, engine/checkpoint.py); after a failure or a `kill -9`, `--resume` continues from the last
complete block and writes the very bytes an uninterrupted run writes. A missing checkpoint and a
checkpoint of another run are refused (exit 2, one line).

A 4-block tiny llama with a byte-level tokenizer, 4 calibration windows of 32 tokens: each run
takes a second or two."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, invoke_cli
from qtool.engine import checkpoint as ck

CALIB = ["--samples", "4", "--seq-len", "32"]
RUNS = {
    "gptq-gptq": ["-m", "gptq", "-b", "4", "-g", "32", "-f", "gptq"],
    "awq-compressed-tensors": ["-m", "awq", "-b", "4", "-g", "32", "--alpha-grid", "4", "--clip-grid", "4"],  # replaced float tensors (rescaled norms)
    "gptq-gguf": ["-m", "gptq", "-f", "gguf", "-t", "Q4_0"],  # a single-file output
    "autoround-gptq": ["-m", "autoround", "--iters", "6", "--lr", "0.05", "--batch-size", "2", "-b", "4", "-g", "32", "-f", "gptq"],  # the float model's stream too
    "aqlm-aqlm": ["-m", "aqlm", "-f", "aqlm", "--steps", "1", "--codebook-steps", "5", "--kmeans-iters", "2"],  # codebook weights
    "aqlm-finetune": ["-m", "aqlm", "-f", "aqlm", "--steps", "1", "--codebook-steps", "5", "--kmeans-iters", "2",
                      "--finetune", "--finetune-epochs", "2"],  # tuned codebooks + replaced norms
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tiny_models import build_tiny_with_byte_tokenizer

    return build_tiny_with_byte_tokenizer(tmp_path_factory.mktemp("resume") / "tiny", num_hidden_layers=4)


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory, smollm2_dir):
    """GGUF needs a tokenizer llama.cpp knows: SmolLM2's, on the same tiny 4-block llama."""
    from tiny_models import build_tiny_with_tokenizer_of

    return build_tiny_with_tokenizer_of(tmp_path_factory.mktemp("resume-gguf") / "tiny", smollm2_dir, num_hidden_layers=4)


def digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {p.relative_to(path).as_posix() if path.is_dir() else p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def quantize(model: Path, out: Path, args: list[str], dataset: Path, *extra: str):
    return invoke_cli("quantize", model, *args, *CALIB, "--dataset", dataset, "-o", out, "-q", *extra)


def fail_after(monkeypatch, k: int) -> None:
    """A Ctrl-C right after block k - 1 is checkpointed (k blocks complete): the CLI exits 130."""
    real = ck.BlockCheckpoint.save

    def save(self, b, *a, **kw):
        real(self, b, *a, **kw)
        if b + 1 == k:
            raise KeyboardInterrupt

    monkeypatch.setattr(ck.BlockCheckpoint, "save", save)


@pytest.mark.parametrize("name", list(RUNS))
def test_resume_after_a_failure_gives_the_same_bytes(name, request, wiki_sample, tmp_path, monkeypatch):
    args = RUNS[name]
    leaf = "q.gguf" if "gguf" in args else "q"
    model = request.getfixturevalue("gguf_model" if "gguf" in args else "model")
    ref = quantize(model, tmp_path / "ref" / leaf, args, wiki_sample)
    assert ref.exit_code == 0, ref.output
    assert not ck.checkpoint_dir(tmp_path / "ref" / leaf).exists()  # removed once the output is complete
    out = tmp_path / "run" / leaf
    with monkeypatch.context() as m:
        fail_after(m, 2)
        stopped = quantize(model, out, args, wiki_sample)
    assert stopped.exit_code == 130 and "2 block(s) are checkpointed" in stopped.output and "--resume" in stopped.output
    assert not out.exists()
    saved = sorted(p.name for p in ck.checkpoint_dir(out).iterdir())
    assert saved == ["block-00000.safetensors", "block-00001.safetensors", "fingerprint.json", "inputs-00002.safetensors"]
    blocks = []
    with monkeypatch.context() as m:  # the resumed run computes blocks 2 and 3 only
        real = ck.BlockCheckpoint.save
        m.setattr(ck.BlockCheckpoint, "save", lambda self, b, *a: (blocks.append(b), real(self, b, *a)))
        r = quantize(model, out, args, wiki_sample, "--resume")
    assert r.exit_code == 0, r.output
    assert blocks == [2, 3]
    assert digest(out) == digest(tmp_path / "ref" / leaf)  # README.md names the output: same leaf name
    assert not ck.checkpoint_dir(out).exists()


def test_resume_after_kill_9_gives_the_same_bytes(model, wiki_sample, tmp_path):
    """A real SIGKILL (no handler, no cleanup) delivered by the process itself right after block 1 is
    checkpointed; then `--resume` in a fresh process."""
    args = [*RUNS["gptq-gptq"], *CALIB, "--dataset", str(wiki_sample), "-q"]
    ref = subprocess.run([sys.executable, "-m", "qtool", "quantize", str(model), *args, "-o", str(tmp_path / "a" / "q")],
                         capture_output=True, text=True, env=_env())
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "b" / "q"
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_points.py"), "checkpoint:2", "quantize", str(model), *args,
                             "-o", str(out)], capture_output=True, text=True, env=_env())
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    assert [p.name for p in (tmp_path / "b").iterdir() if ".qtool-partial-" in p.name]  # the kill left its temporary
    resumed = subprocess.run([sys.executable, "-m", "qtool", "quantize", str(model), *args, "-o", str(out), "--resume"],
                             capture_output=True, text=True, env=_env())
    assert resumed.returncode == 0, resumed.stderr
    assert digest(out) == digest(tmp_path / "a" / "q")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["q"]  # checkpoint and stale temporary gone


def test_resume_without_a_checkpoint_is_refused(model, wiki_sample, tmp_path):
    r = quantize(model, tmp_path / "q", RUNS["gptq-gptq"], wiki_sample, "--resume")
    assert r.exit_code == 2
    assert "--resume: no checkpoint" in r.output and len(r.output.strip().splitlines()) == 1
    rtn = invoke_cli("quantize", model, "-b", "4", "-o", tmp_path / "r", "--resume")
    assert rtn.exit_code == 2 and "nothing to resume" in rtn.output


def test_resume_with_another_recipe_is_refused(model, wiki_sample, tmp_path, monkeypatch):
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        fail_after(m, 1)
        assert quantize(model, out, RUNS["gptq-gptq"], wiki_sample).exit_code == 130
    other = [a if a != "32" else "64" for a in RUNS["gptq-gptq"]]  # -g 64
    r = quantize(model, out, other, wiki_sample, "--resume")
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert len(line.splitlines()) == 1 and "another run" in line and "group_size" in line and "32" in line and "64" in line
    r = invoke_cli("quantize", model, *RUNS["gptq-gptq"], "--samples", "3", "--seq-len", "32", "--dataset", wiki_sample,
                   "-o", out, "-q", "--resume")
    assert r.exit_code == 2 and "samples" in r.output
    (model / "config.json").touch()  # same bytes: still resumable
    ok = quantize(model, out, RUNS["gptq-gptq"], wiki_sample, "--resume")
    assert ok.exit_code == 0, ok.output


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
