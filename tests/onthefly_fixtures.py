"""Shared by tests/test_hqq.py, test_quanto_format.py and test_quark_format.py: the tiny sources,
the qtool outputs their consumer tests judge, and ONE run of tests/onthefly_consumer.py over all
of them in the isolated venv `make hqq-quanto-quark-venv` builds (its imports dominate its time).
Without that venv the consumer tests are skipped, saying which target builds it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import invoke_cli
from tiny_models import build_tiny, make_config, make_model, save_random

ROOT = Path(__file__).resolve().parents[1]
CONSUMER_PY = Path(os.environ.get("QTOOL_CACHE", ROOT / ".cache")) / "hqq-quanto-quark-venv" / "bin" / "python"

# name -> (source, qtool quantize flags, consumer kind)
CASES = {
    "hqq-h4g32": ("llama32", "-m hqq -b 4 -g 32 -f hqq", "hqq"),
    "hqq-h3g32": ("llama32", "-m hqq -b 3 -g 32 -f hqq", "hqq"),
    "hqq-h2g16": ("llama32", "-m hqq -b 2 -g 16 -f hqq", "hqq"),
    "hqq-h8ch": ("llama32", "-m hqq -b 8 -g channel -f hqq", "hqq"),
    "hqq-rtn4-tied": ("gemma2_32", "-m rtn -b 4 -g 32 -f hqq", "hqq"),  # tied lm_head, symmetric zero 8
    "quanto-h4": ("llama32", "-m hqq -b 4 -g 128 -f quanto", "quanto"),  # float shift
    "quanto-r4asym-wide": ("wide", "-m rtn -b 4 -g 128 --asym -f quanto", "quanto"),  # bf16 g128: TinyGemm path
    "quanto-r2": ("llama32", "-m rtn -b 2 -g 128 -f quanto", "quanto"),
    "quanto-r8": ("llama32", "-m rtn -b 8 -f quanto", "quanto"),
    "quanto-fp8": ("llama32", "--qtype fp8 -f quanto", "quanto"),
    "quark-r4asym": ("llama32", "-m rtn -b 4 -g 32 --asym -f quark", "quark"),
    "quark-r4sym-bf16": ("llama", "-m rtn -b 4 -g 32 -f quark", "quark"),
    "quark-h4": ("llama32", "-m hqq -b 4 -g 32 -f quark", "quark"),  # float zeros rounded
    "quark-fp8": ("llama", "--qtype fp8 -f quark", "quark"),
    "quark-fp8-tensor": ("llama32", "--qtype fp8 -g tensor -f quark", "quark"),
}
HQQ_CASES = [(4, 64), (3, 32), (2, 16), (8, 128), (1, 32), (5, 64)]  # (nbits, group) for hqq's own Quantizer


def build_sources(root: Path) -> dict[str, Path]:
    """llama (bf16), llama32 / gemma2_32 (the same weights in float32: runtimes then compute in
    float32, so logits agree tightly; gemma2: tied embeddings), wide (bf16, widths 256/384:
    quanto's g128). (hqq's loader on the bf16 gemma2 gives the same weights but logits 4.5e-3
    off ours: it builds that model in the config's bf16 before casting, an hqq-side rounding.)"""
    src = {"llama": build_tiny("llama", root / "llama")}
    for arch, key in (("llama", "llama32"), ("gemma2", "gemma2_32")):
        make_model(arch).float().save_pretrained(root / key)
        src[key] = root / key
    cfg = make_config("llama")
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 256, 384, 64
    src["wide"] = save_random(cfg, root / "wide", 7)
    return src


@pytest.fixture(scope="session")
def otf_sources(tmp_path_factory) -> dict[str, Path]:
    return build_sources(tmp_path_factory.mktemp("otf-src"))


@pytest.fixture(scope="session")
def otf_outputs(otf_sources, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("otf-out")
    outs = {}
    for name, (src, flags, _) in CASES.items():
        r = invoke_cli("quantize", otf_sources[src], *flags.split(), "-o", root / name, "--quiet")
        assert r.exit_code == 0, f"{name}: {r.output}"
        outs[name] = root / name
    return outs


@pytest.fixture(scope="session")
def hqq_weight() -> torch.Tensor:
    """A weight with heavy tails and a few outliers, where the zero point matters."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(64, 256, generator=g) * 0.02
    w += 0.1 * (torch.rand(64, 256, generator=g) < 0.01) * torch.randn(64, 256, generator=g)
    return w


@pytest.fixture(scope="session")
def otf_consumed(otf_outputs, hqq_weight, tmp_path_factory) -> dict:
    """{case name | "hqq-quantize" | "quanto-quantize": consumer result} from one consumer run."""
    if not CONSUMER_PY.exists():
        pytest.skip(f"{CONSUMER_PY} missing: `make hqq-quanto-quark-venv` installs hqq, optimum-quanto and amd-quark there")
    root = tmp_path_factory.mktemp("otf-consumer")
    job, qjob = root / "hqq_job.pt", root / "quanto_job.pt"
    torch.save({"w": hqq_weight, "cases": HQQ_CASES}, job)
    torch.save({"w": quanto_weight()}, qjob)
    result = root / "consumer.pt"
    jobs = [f"{CASES[n][2]}:{p}" for n, p in otf_outputs.items()] + [f"hqq-quantize:{job}", f"quanto-quantize:{qjob}"]
    p = subprocess.run([str(CONSUMER_PY), str(ROOT / "tests" / "onthefly_consumer.py"), str(result), *jobs],
                       capture_output=True, text=True, timeout=1500, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    raw = torch.load(result, weights_only=False)
    by_job = {f"{CASES[n][2]}:{p}": n for n, p in otf_outputs.items()}
    return {by_job.get(k, k.partition(":")[0]): v for k, v in raw.items()}


def quanto_weight() -> torch.Tensor:
    """bf16, heavy-tailed, for quanto's own qint8 / qfloat8 quantizer (no all-zero row: quanto would
    divide by its zero scale there, where qtool stores scale 1)."""
    g = torch.Generator().manual_seed(12)
    w = torch.randn(96, 320, generator=g) * 0.02
    w += 0.2 * (torch.rand(96, 320, generator=g) < 0.005) * torch.randn(96, 320, generator=g)
    return w.to(torch.bfloat16)


def assert_runtime_matches(res: dict, folder: Path, reader, weight_atol, logits_atol: float) -> dict:
    """A consumer result against our reading of `folder`: the same 14 quantized modules, each one's
    weight as the runtime computes with it (weight_atol: float, or a function of our weight), and
    the logits. Returns our QuantizedWeights."""
    import json

    from qtool.evaluate import model_from_state

    assert not res["meta_params"]
    qws, _ = reader.read_quantized(folder)
    assert set(res["weights"]) == set(qws) and len(qws) == 14
    for m, w in res["weights"].items():
        ours = qws[m].dequantize(torch.float32)
        torch.testing.assert_close(w, ours, rtol=0, atol=weight_atol(ours) if callable(weight_atol) else weight_atol)
    config = json.loads((folder / "config.json").read_text())
    model = model_from_state(config, reader.read_dequantized(folder), folder)
    with torch.no_grad():
        ours_logits = model(res["ids"]).logits[0].float()
    torch.testing.assert_close(res["logits"], ours_logits, rtol=0, atol=logits_atol)
    return {"qws": qws, "logits": ours_logits}


def assert_refused(source: Path, flags: str, fmt: str, words: str, tmp: Path) -> None:
    """`qtool quantize SOURCE FLAGS -f FMT` exits 3 with `words` in its message, writing nothing."""
    r = invoke_cli("quantize", source, *flags.split(), "-f", fmt, "-o", tmp / "x")
    assert r.exit_code == 3 and words in r.output, r.output
    assert not (tmp / "x").exists()
