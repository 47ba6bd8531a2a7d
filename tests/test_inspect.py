"""`qtool inspect`: exact parameter counts, bits per weight, memory and detection on plain, sharded,
compressed-tensors and GGUF checkpoints, locally and through a fake Hub (headers only)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hub_server import fake_hub, hub_env
from qtool.cli.main import app
from qtool.errors import FormatError
from qtool.inspect import inspect_model, kv_cache_from_config, layer_kind

REPO_ROOT = Path(__file__).resolve().parents[1]
CTX, BATCH = 1000, 3
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("QTOOL_DEBUG", raising=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A seeded tiny llama saved in bf16 (single file and sharded) and quantized by our CLI."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(root / "plain")
    model.save_pretrained(root / "sharded", max_shard_size="50KB")
    res = CliRunner().invoke(app, ["quantize", str(root / "plain"), "-b", "4", "-g", "32", "-o", str(root / "ct"), "-q"])
    assert res.exit_code == 0, res.output
    quantized = sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 2)[-2] in LINEARS)
    return {"root": root, "params": sum(p.numel() for p in model.parameters()), "quantized": quantized,
            "config": json.loads((root / "plain" / "config.json").read_text())}


def kv_formula(config: dict, ctx: int, batch: int) -> int:
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * ctx * batch * 2


# -- local safetensors -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["plain", "plain/model.safetensors", "sharded"], ids=["folder", "file", "sharded"])
def test_plain_counts_every_parameter_at_16_bits(tiny, target):
    path = tiny["root"] / target
    r = inspect_model(str(path), ctx=CTX, batch=BATCH)
    folder = path if path.is_dir() else path.parent
    assert (r.format, r.format_detail, r.method) == ("safetensors", "BF16", "none")
    assert r.params == tiny["params"] and r.params_quantized == 0
    assert r.bpw_model == 16.0 and r.bpw_quantized is None
    assert r.tensor_bytes == 2 * tiny["params"]
    assert r.file_bytes == sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert len(r.files) == len(list(folder.glob("*.safetensors")))
    assert r.memory_bytes == r.tensor_bytes + kv_formula(tiny["config"], CTX, BATCH)
    assert {g["kind"] for g in r.groups()} == {"attention", "mlp", "embeddings", "norms", "output"}


def test_compressed_tensors_counts_logical_params_and_bits(tiny):
    r = inspect_model(str(tiny["root"] / "ct"), ctx=CTX, batch=BATCH)
    assert (r.format, r.format_detail, r.method) == ("compressed-tensors", "pack-quantized", "rtn")
    assert r.params == tiny["params"]  # from weight_shape, not from the int32 weight_packed
    assert r.params_quantized == tiny["quantized"]
    assert r.bpw_quantized == 4.5  # 4-bit codes + one bf16 scale per 32: exact
    unquantized = tiny["params"] - tiny["quantized"]
    assert r.bpw_model == (4.5 * tiny["quantized"] + 16 * unquantized) / tiny["params"]
    assert r.memory_bytes == r.tensor_bytes + kv_formula(tiny["config"], CTX, BATCH)
    assert r.tensor_bytes <= r.file_bytes == (tiny["root"] / "ct" / "model.safetensors").stat().st_size
    by_kind = {g["kind"]: g for g in r.groups() if g["quantized"]}
    assert set(by_kind) == {"attention", "mlp"}
    assert by_kind["attention"]["type"] == "int4 g32 sym" and by_kind["attention"]["bits"] == 4.5
    assert {tuple(s["shape"]) for s in by_kind["mlp"]["shapes"]} == {(128, 64), (64, 128)}


VARIANTS = {
    "int4-g32-asym": (["-b", "4", "-g", "32", "--asym"], "int4 g32 asym"),
    "int3-g32": (["-b", "3", "-g", "32"], "int3 g32 sym"),
    "int8-channel": (["-b", "8", "-g", "channel"], "int8 channel sym"),
    "fp8-tensor": (["--qtype", "fp8", "-g", "tensor"], "fp8 tensor"),
}


@pytest.fixture(scope="module")
def variants(tiny) -> dict[str, tuple[Path, dict]]:
    """Other recipes, each with the quantize report (its bpw is computed from the codes, not files)."""
    out = {}
    for name, (flags, _) in VARIANTS.items():
        dest = tiny["root"] / name
        res = CliRunner().invoke(app, ["quantize", str(tiny["root"] / "plain"), *flags, "-o", str(dest), "--json"])
        assert res.exit_code == 0, res.output
        out[name] = (dest, json.loads(res.stdout))
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_compressed_tensors_variants(tiny, variants, name):
    dest, quant_report = variants[name]
    r = inspect_model(str(dest))
    assert r.params == tiny["params"] and r.params_quantized == tiny["quantized"]
    # zero points (asym), 3-bit words crossing int32 boundaries, per-channel and per-tensor scales:
    # the stored bits inspect counts from the files equal what quantize counted from the codes
    assert r.bpw_quantized == pytest.approx(quant_report["bpw_quantized"], abs=5e-5)  # quantize rounds to 4 places
    assert {g["type"] for g in r.groups() if g["quantized"]} == {VARIANTS[name][1]}


def test_cli_json_and_table(tiny):
    runner = CliRunner()
    ct = str(tiny["root"] / "ct")
    res = runner.invoke(app, ["inspect", ct, "--json", "--ctx", str(CTX), "--batch", str(BATCH)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    lib = inspect_model(ct, ctx=CTX, batch=BATCH).to_dict()
    assert data["totals"] == lib["totals"] and data["memory"] == lib["memory"] and data["groups"] == lib["groups"]
    assert data["totals"]["params"] == tiny["params"] and data["method"] == "rtn"
    res = runner.invoke(app, ["inspect", ct], env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    for text in ("int4 g32 sym", "MLP", "output/lm_head", "4.5", "rtn", "compressed-tensors (pack-quantized)", f"{tiny['params']:,}"):
        assert text in res.stdout, text


# -- KV cache and layer kinds -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64}, 2 * 2 * 2 * 16),
        ({"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64, "head_dim": 32}, 2 * 2 * 2 * 32),
        ({"num_hidden_layers": 3, "num_attention_heads": 4, "hidden_size": 64}, 2 * 3 * 4 * 16),
        ({"model_type": "llava", "text_config": {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}}, 2 * 2 * 4 * 16),
    ],
    ids=["gqa", "explicit-head-dim", "no-kv-heads-means-mha", "text-config"],
)
def test_kv_cache_per_token(config, expected):
    kv = kv_cache_from_config(config, ctx=10, batch=2)
    assert kv is not None and kv.bytes == expected * 10 * 2 * 2  # × ctx × batch × 2 bytes


def test_kv_cache_unknown_without_attention_config():
    assert kv_cache_from_config({"model_type": "mystery"}, 4096, 1) is None


@pytest.mark.parametrize(
    "name, kind",
    [("model.layers.0.self_attn.q_proj.weight", "attention"), ("model.layers.0.mlp.down_proj.weight", "mlp"),
     ("model.layers.0.mlp.experts.3.up_proj.weight", "moe"), ("model.layers.0.mlp.gate.weight", "moe"),
     ("model.embed_tokens.weight", "embeddings"), ("model.layers.1.post_attention_layernorm.weight", "norms"),
     ("lm_head.weight", "output"), ("blk.0.attn_q.weight", "attention"), ("blk.0.ffn_up_exps.weight", "moe"),
     ("blk.0.attn_norm.weight", "norms"), ("token_embd.weight", "embeddings"), ("output.weight", "output"),
     ("output_norm.weight", "norms"), ("rope_freqs", "other")],
)
def test_layer_kind(name, kind):
    assert layer_kind(name) == kind


# -- GGUF ------------------------------------------------------------------------------------------


def write_gguf(path: Path) -> dict[str, tuple[str, int]]:
    """A tiny llama GGUF: Q8_0 matrices, F32 norms and output. Returns name -> (type, numel)."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(["<a>", "<b>", "c"])
    w.add_token_merges(["c c"])
    w.add_bos_token_id(0)
    w.add_chat_template("{{ messages }}")
    spec = {"token_embd.weight": ((128, 64), "Q8_0"), "blk.0.attn_q.weight": ((64, 64), "Q8_0"),
            "blk.0.ffn_up.weight": ((128, 64), "Q8_0"), "blk.0.attn_norm.weight": ((64,), "F32"),
            "output_norm.weight": ((64,), "F32"), "output.weight": ((128, 64), "F32")}
    for name, (shape, typ) in spec.items():
        x = rng.standard_normal(shape).astype(np.float32)
        if typ == "Q8_0":
            w.add_tensor(name, gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {n: (t, int(np.prod(s))) for n, (s, t) in spec.items()}


def test_gguf_types_bits_and_memory(tmp_path):
    path = tmp_path / "tiny.gguf"
    spec = write_gguf(path)
    r = inspect_model(str(path), ctx=CTX, batch=BATCH)
    assert (r.format, r.format_detail, r.method) == ("gguf", "Q8_0", "Q8_0")
    types = {t.name: t.type for t in r.tensors}
    assert types == {n: t for n, (t, _) in spec.items()}
    assert r.params == sum(n for _, n in spec.values())
    assert r.params_quantized == sum(n for t, n in spec.values() if t == "Q8_0")
    assert r.bpw_quantized == 8.5  # 32 int8 + one f16 scale per block of 32
    assert {t.name: t.bits for t in r.tensors}["output.weight"] == 32.0
    assert {t.name: t.shape for t in r.tensors}["blk.0.ffn_up.weight"] == (128, 64)
    # block_count 2 × head_count_kv 2 × (16 + 16) (embedding_length / head_count) × ctx × batch × 2 bytes
    assert r.kv_cache is not None and r.kv_cache.bytes == 2 * 2 * 2 * 16 * CTX * BATCH * 2
    assert r.memory_bytes == r.tensor_bytes + r.kv_cache.bytes
    assert r.file_bytes == path.stat().st_size
    res = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["totals"]["bpw_quantized"] == 8.5
    # the metadata summary: hyper-parameters and what the tokenizer is
    meta = json.loads(res.stdout)["metadata"]
    assert (meta["architecture"], meta["block_count"], meta["attention.head_count_kv"]) == ("llama", 2, 2)
    assert meta["tokenizer"] == {"model": "gpt2", "pre": "smollm", "vocab_size": 3, "merges": 1, "scores": None,
                                 "bos_token_id": 0, "eos_token_id": None, "add_bos_token": None,
                                 "chat_template": "14 characters"}
    assert "tokenizer" in CliRunner().invoke(app, ["inspect", str(path)]).stdout


# -- bad input ------------------------------------------------------------------------------------


def _corrupt_json(p: Path) -> None:
    p.write_bytes(struct.pack("<Q", 16) + b"{not json at al}" + b"\0" * 64)


def _truncated(p: Path) -> None:
    p.write_bytes(struct.pack("<Q", 10_000) + b"{}")


def _bad_gguf(p: Path) -> None:
    p.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\xff" * 40)


@pytest.mark.parametrize(
    "name, make, needle",
    [("missing", None, "no such file"), ("model.safetensors", _corrupt_json, "corrupted safetensors header"),
     ("model.safetensors", _truncated, "corrupted safetensors header"), ("bad.gguf", _bad_gguf, "GGUF")],
    ids=["missing-path", "corrupt-header", "truncated-header", "bad-gguf"],
)
def test_bad_input_exits_5_with_one_line(tmp_path, name, make, needle):
    path = tmp_path / name
    if make is not None:
        make(path)
    res = CliRunner().invoke(app, ["inspect", str(path)])
    assert res.exit_code == 5, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and str(path) in lines[0], res.stderr
    assert "Traceback" not in res.output


# -- the Hub (a local fake) ------------------------------------------------------------------------


def header_end(path: Path) -> int:
    """Bytes 0..header_end-1 of a safetensors file are its length prefix and JSON header."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def assert_headers_only(hub, repo: str, folder: Path) -> None:
    gets = [r for r in hub.resolve_requests(repo, "*.safetensors") if r.method == "GET"]
    assert gets, "no safetensors request at all"
    for r in gets:
        assert r.status == 206 and r.range is not None, r
        assert r.range[1] < header_end(folder / r.file), f"{r.file}: fetched bytes {r.range}, past the header"
    assert hub.files_downloaded(repo) <= {"config.json", "model.safetensors.index.json"} | {r.file for r in gets}


def test_hub_inspect_matches_local_and_reads_headers_only(tiny, variants, tmp_path, monkeypatch):
    """Remotely, pack-quantized shapes come from the header shapes alone (weight_shape values are
    data): they must still equal the local, exact figures."""
    repos = {"org/ct": tiny["root"] / "ct", "org/sharded": tiny["root"] / "sharded",
             **{f"org/{name}": dest for name, (dest, _) in variants.items()}}
    with fake_hub(repos) as hub:
        hub_env(hub, tmp_path / "hf", monkeypatch)
        for repo, folder in repos.items():
            remote = inspect_model(repo, ctx=CTX, batch=BATCH).to_dict()
            local = inspect_model(str(folder), ctx=CTX, batch=BATCH).to_dict()
            for key in ("format", "format_detail", "method", "files", "groups", "totals", "memory", "tensors"):
                assert remote[key] == local[key], (repo, key)
            assert_headers_only(hub, repo, folder)
        with pytest.raises(FormatError, match="org/missing: not found on the Hub"):
            inspect_model("org/missing")
        with pytest.raises(FormatError, match="org/ct: not found on the Hub"):
            inspect_model("org/ct", revision="no-such-branch")


def test_hub_cli_in_a_subprocess(tiny, tmp_path, monkeypatch):
    """The most faithful route: a fresh process that reads HF_ENDPOINT at import time."""
    folder = tiny["root"] / "plain"
    with fake_hub({"org/tiny": folder}) as hub:
        env = hub_env(hub, tmp_path / "hf", monkeypatch)
        proc = subprocess.run([sys.executable, "-m", "qtool", "inspect", "org/tiny", "--json"], env=env,
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        local = inspect_model(str(folder)).to_dict()
        assert data["totals"] == local["totals"] and data["groups"] == local["groups"]
        assert data["totals"]["params"] == tiny["params"] and data["source"] == "org/tiny"
        assert_headers_only(hub, "org/tiny", folder)
        assert hub.bytes_served("org/tiny", "*.safetensors") == header_end(folder / "model.safetensors")


def test_fake_hub_serves_what_huggingface_hub_calls(tiny, tmp_path, monkeypatch):
    """The endpoints other tests rely on: snapshot_download with patterns, hf_hub_download,
    model_info, list_repo_files, get_safetensors_metadata; and offline inspect from the cache."""
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

    folder = tiny["root"] / "sharded"
    (tmp_path / "repo").mkdir()
    for f in folder.iterdir():
        (tmp_path / "repo" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "repo" / "pytorch_model.bin").write_bytes(b"pickle")
    with fake_hub({"org/sharded": tmp_path / "repo"}) as hub:
        hub_env(hub, tmp_path / "hf", monkeypatch)
        api = HfApi()
        info = api.model_info("org/sharded")
        assert "pytorch_model.bin" in {s.rfilename for s in info.siblings}
        assert sorted(api.list_repo_files("org/sharded")) == sorted(p.name for p in (tmp_path / "repo").iterdir())
        meta = api.get_safetensors_metadata("org/sharded")
        assert meta.sharded and meta.parameter_count == {"BF16": tiny["params"]}
        cfg = hf_hub_download("org/sharded", "config.json", revision=info.sha)
        assert json.loads(Path(cfg).read_text()) == tiny["config"]
        hub.clear()
        snap = Path(snapshot_download("org/sharded", allow_patterns=["*.safetensors", "*.json"]))
        wanted = {p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".json")}
        assert {p.name for p in snap.iterdir()} == wanted
        # config.json and the index were cached by the calls above; the rest came now, and no *.bin
        assert hub.files_downloaded() == wanted - {"config.json", "model.safetensors.index.json"}
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        hub.clear()
        offline = inspect_model("org/sharded")
        assert offline.params == tiny["params"] and not hub.requests
