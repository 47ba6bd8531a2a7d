"""A `kill -9` at any point of a quantize run never leaves a complete-looking output: the final
name appears only by the atomic rename of a finished temporary, so after a SIGKILL it is either
absent (only a hidden `.NAME.qtool-partial-PID` remains, removed by the next run) or complete.

Kill points: deterministic ones inside the run (tests/kill_points.py: the process SIGKILLs itself
when the writer gets its 3rd tensor, after the writer finished its files, just before the rename)
and seeded random moments from outside, for a folder format and a single-file one (tiny llama,
RTN: each run is its interpreter start plus well under a second of work)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

FORMATS = {"compressed-tensors": (["-b", "4", "-g", "32"], "q"), "gguf": (["-f", "gguf", "-t", "Q4_0"], "q.gguf")}
# (format, point): every point for the folder format; for GGUF (its tokenizer makes each run a few
# seconds longer) the last one, where a finished temporary file sits beside the missing final name
CASES = [("compressed-tensors", p) for p in ("tensor:3", "finish", "rename")] + [("gguf", "rename")]


@pytest.fixture(scope="module")
def model(tmp_path_factory, smollm2_dir):
    from tiny_models import build_tiny_with_tokenizer_of

    return build_tiny_with_tokenizer_of(tmp_path_factory.mktemp("kill9") / "tiny", smollm2_dir)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """Each format's complete output and the seconds an uninterrupted run takes."""
    made = {}
    for fmt, (args, leaf) in FORMATS.items():
        out = tmp_path_factory.mktemp(f"ref-{fmt}") / leaf
        t0 = time.perf_counter()
        r = subprocess.run(_cmd(model, args, out), capture_output=True, text=True, env=_env())
        assert r.returncode == 0, r.stderr
        made[fmt] = (_digest(out), time.perf_counter() - t0)
    return made


def _cmd(model: Path, args: list[str], out: Path, point: str | None = None) -> list[str]:
    head = [sys.executable, str(ROOT / "tests" / "kill_points.py"), point] if point else [sys.executable, "-m", "qtool"]
    return [*head, "quantize", str(model), *args, "-o", str(out), "-q"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {p.name if path.is_file() else p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files if p.name != "README.md"}  # the card names the output path


def _check_after_kill(folder: Path, leaf: str, ref: dict[str, str]) -> str:
    """The final name is absent (only hidden temporaries remain) or holds a complete output."""
    out = folder / leaf
    others = [p.name for p in folder.iterdir() if p.name != leaf]
    assert all(n.startswith(f".{leaf}.qtool-partial-") for n in others), others
    if out.exists():
        assert _digest(out) == ref, "a complete-looking output that is not the complete one"
        return "complete"
    return "absent"


@pytest.mark.parametrize("fmt, point", CASES)
def test_kill_inside_the_run_leaves_no_output(fmt, point, model, reference, tmp_path):
    args, leaf = FORMATS[fmt]
    r = subprocess.run(_cmd(model, args, tmp_path / leaf, point), capture_output=True, text=True, env=_env())
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert _check_after_kill(tmp_path, leaf, reference[fmt][0]) == "absent"
    assert any(p.name.startswith(f".{leaf}.qtool-partial-") for p in tmp_path.iterdir())  # the killed run's temporary
    if point != "rename":
        return
    again = subprocess.run(_cmd(model, args, tmp_path / leaf), capture_output=True, text=True, env=_env())
    assert again.returncode == 0, again.stderr
    assert [p.name for p in tmp_path.iterdir()] == [leaf]  # stale temporary of the dead run removed
    assert _digest(tmp_path / leaf) == reference[fmt][0]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_kill_at_random_moments_leaves_no_partial_output(fmt, model, reference, tmp_path):
    args, leaf = FORMATS[fmt]
    ref, seconds = reference[fmt]
    rng = random.Random(f"kill9-{fmt}")
    seen = []
    for i in range(2 if fmt == "compressed-tensors" else 1):
        folder = tmp_path / str(i)
        folder.mkdir()
        p = subprocess.Popen(_cmd(model, args, folder / leaf), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
        time.sleep(rng.uniform(0.3, 1.1) * seconds)  # most of a run is interpreter start; the rest is writing
        p.send_signal(signal.SIGKILL)
        p.wait()
        seen.append(_check_after_kill(folder, leaf, ref))
    print(f"{fmt}: outputs after random kills: {seen}")
