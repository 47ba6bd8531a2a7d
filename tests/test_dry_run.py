"""`qtool quantize ... --dry-run`: the plan from headers, nothing written; a Hub id costs its small
files and two Range requests per safetensors header (the fake Hub of tests/hub_server.py counts
them); estimates against the real run; every refusal with the real run's exit code and message."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hub_server import fake_hub, hub_env

from conftest import invoke_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    from tiny_models import build_tiny_with_tokenizer_of

    return build_tiny_with_tokenizer_of(tmp_path_factory.mktemp("dry") / "tiny", smollm2_dir)


def dry(*args) -> tuple[int, dict]:
    r = invoke_cli("quantize", *args, "--dry-run", "--json")
    return r.exit_code, json.loads(r.stdout)


def scratch_left() -> list[str]:
    return sorted(p.name for p in Path(tempfile.gettempdir()).glob("qtool-dry-run-*"))


RUNS = {  # the plan's sizes and bits per weight against what the real run writes and reports
    "ct-g32": ["-b", "4", "-g", "32"],
    "gptq-asym": ["-b", "4", "-g", "32", "--asym", "-f", "gptq"],
    "gguf-Q4_K_M": ["-f", "gguf", "-t", "Q4_K_M"],
    "awq+ct": ["-b", "4", "-g", "32", "--asym", "-f", "awq,compressed-tensors"],
    # codes, codebooks and scales counted (the plan once showed --bits' 4 per weight for AQLM)
    "aqlm-2x8": ["-m", "aqlm", "-f", "aqlm", "--steps", "1", "--codebook-steps", "2", "--kmeans-iters", "2", "--samples", "2",
                 "--seq-len", "16"],
}


@pytest.mark.parametrize("name", list(RUNS))
def test_plan_matches_the_run(name, tiny, tmp_path, wiki_sample):
    args = RUNS[name] + (["--dataset", str(wiki_sample)] if "aqlm" in name else [])
    out = tmp_path / ("q.gguf" if "gguf" in args else "q")
    before = scratch_left()
    code, plan = dry(tiny, *args, "-o", out)
    assert code == 0 and plan["exit_code"] == 0 and plan["refusals"] == [], plan["refusals"]
    assert not out.exists() and list(tmp_path.iterdir()) == [] and scratch_left() == before  # nothing written
    real = invoke_cli("quantize", tiny, *args, "-o", out, "--json")
    assert real.exit_code == 0, real.output
    done = json.loads(real.stdout)
    done = done.get("outputs", [done])
    (run,) = plan["runs"]
    assert run["bpw_quantized"] == done[0]["bpw_quantized"]  # the same count of storage bits
    assert len(run["layers"]) == len(done[0]["layers"])
    # sizes: GGUF exact up to the alignment of the last tensor; packed folder formats within 0.5 %
    # (small files and header JSON are estimated)
    sizes = run["sizes"] or {run["format"]: run["output_bytes"]}
    for fmt, est in sizes.items():
        where = out if len(sizes) == 1 else out / fmt
        actual = where.stat().st_size if where.is_file() else sum(f.stat().st_size for f in where.rglob("*") if f.is_file())
        assert abs(est - actual) <= (32 if fmt == "gguf" else 0.005 * actual), (fmt, est, actual)
    assert plan["peak_memory_bytes"] > 0 and "measured here" in plan["time_how"]
    if "aqlm" in name:  # no time model for AQLM's code search: said, not guessed
        assert plan["seconds"] is None and "no time model for --method aqlm" in plan["time_how"]
    else:
        assert plan["seconds"] > 0


def test_calibration_plan_names_its_memory_and_time_terms(tiny_byte_llama, wiki_sample, tmp_path):
    code, plan = dry(tiny_byte_llama, "-m", "gptq", "-b", "4", "-g", "32", "--dataset", wiki_sample, "--samples", "8",
                     "--seq-len", "64", "-o", tmp_path / "q")
    assert code == 0, plan["refusals"]
    terms = plan["memory_terms"]
    assert any(k.startswith("activations") for k in terms) and "the largest Hessian while summed (float64 sum + float32 product)" in terms
    # down_proj's input width: the float64 sum and one window's float32 XᵀX alive together
    assert terms["the largest Hessian while summed (float64 sum + float32 product)"] == 160 ** 2 * (8 + 4)
    assert "gptq:" in plan["time_how"] and "TFLOP" in plan["time_how"]


def test_hub_dry_run_reads_headers_only(tiny, tmp_path, monkeypatch):
    _, local = dry(tiny, "-b", "4", "-g", "32", "-o", tmp_path / "a")
    with fake_hub({"org/tiny": tiny}) as hub:
        hub_env(hub, tmp_path / "hf", monkeypatch)
        code, plan = dry("org/tiny", "-b", "4", "-g", "32", "-o", tmp_path / "b")
        weights = hub.resolve_requests("org/tiny", "*.safetensors")
        got = hub.files_downloaded("org/tiny")
    assert code == 0, plan["refusals"]
    assert "model.safetensors" not in {r.file for r in weights if r.method == "GET" and r.range is None}
    assert all(r.range is not None for r in weights if r.method == "GET")  # Range requests only: 8 bytes + the header
    assert sum(r.body_bytes for r in weights) < 20_000  # the model is 18 MiB
    assert "config.json" in got and "tokenizer.json" in got
    assert plan["source"].startswith("Hub repository org/tiny") and plan["input_bytes"] == (tiny / "model.safetensors").stat().st_size
    assert plan["runs"][0]["layers"] == local["runs"][0]["layers"]
    assert plan["runs"][0]["bpw_quantized"] == local["runs"][0]["bpw_quantized"]
    assert not (tmp_path / "b").exists()


# refusals: (setup, args) -> the dry run names the real run's first refusal, with its exit code
def _exists(tmp_path: Path) -> Path:
    (tmp_path / "q").mkdir()
    return tmp_path / "q"


REFUSALS = {
    "output-exists": (_exists, ["-b", "4"]),
    "gptq-3bit-widths": (None, ["-b", "3", "-f", "gptq"]),
    "push-without-token": (None, ["-b", "4", "--push-to-hub", "me/tiny"]),
    "resume-without-checkpoint": (None, ["-m", "gptq", "-b", "4", "--dataset", "{wiki}", "--resume"]),
    "calibration-file-missing": (None, ["-m", "gptq", "-b", "4", "--dataset", "/no/such/calib.txt"]),
    "stats-of-another-model": (None, ["-m", "gptq", "-b", "4", "--stats", "{stats}"]),
}


@pytest.fixture(scope="module")
def other_stats(tmp_path_factory, wiki_sample):
    """`qtool calibrate` statistics of a model with other widths."""
    from tiny_models import build_tiny_with_byte_tokenizer

    folder = tmp_path_factory.mktemp("other")
    other = build_tiny_with_byte_tokenizer(folder / "byte", hidden_size=64, intermediate_size=128)
    stats = folder / "stats.safetensors"
    r = invoke_cli("calibrate", other, "--dataset", wiki_sample, "--samples", "2", "--seq-len", "16", "-o", stats, "-q")
    assert r.exit_code == 0, r.output
    return stats


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_the_runs(case, tiny_byte_llama, wiki_sample, other_stats, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    setup, args = REFUSALS[case]
    out = setup(tmp_path) if setup else tmp_path / "q"
    args = [a.format(wiki=wiki_sample, stats=other_stats) for a in args]
    code, plan = dry(tiny_byte_llama, *args, "-o", out)
    assert plan["refusals"], case
    first = plan["refusals"][0]
    real = invoke_cli("quantize", tiny_byte_llama, *args, "-o", out)
    assert real.exit_code == code == first["exit_code"] != 0
    assert first["message"] in " ".join(real.output.split()), (first["message"], real.output)


def test_several_refusals_in_one_plan(tiny_byte_llama, tmp_path, monkeypatch):
    """The run would stop at the first; the plan lists each output's."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    (tmp_path / "q").mkdir()
    code, plan = dry(tiny_byte_llama, "-b", "3", "-f", "gptq,compressed-tensors", "-o", tmp_path / "q", "--push-to-hub", "me/x")
    stages = [r["stage"] for r in plan["refusals"]]
    assert stages == ["publish", "output", "writer"], plan["refusals"]
    assert code == 2 and plan["runs"][0]["refusal"]["stage"] == "output"
