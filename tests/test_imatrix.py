"""Importance matrices (qtool/formats/gguf/imatrix.py) and `--imatrix` on GGUF quantization.

* write_imatrix / read_imatrix round trip, Hugging Face names -> GGUF names (MoE experts stacked);
* the GGUF writer hands each tensor (each expert) its own column weights: bytes equal
  `quantize_tensor(rows, type, importance)` tensor by tensor; llama-quantize's imatrix-only rule;
* bad files: exit 5, one line naming the file (and entry), nothing written;
* llama.cpp both ways, on SmolLM2 with 4 chunks of 128 tokens of wikitext-2: `llama-imatrix`'s files
  (GGUF and legacy .dat) are read and rewritten byte for byte; `qtool export --imatrix` and
  `llama-quantize --imatrix` give the same tensors (types and bytes) and the same quantize.imatrix.*
  keys; an imatrix qtool writes from its own statistics gives the same file in both.

The llama.cpp part is skipped, naming what is missing, when the tools are not built (make llama-cpp).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import CACHE
from qtool.errors import FormatError
from qtool.formats.gguf import mixtures as mx
from qtool.formats.gguf import quants
from qtool.formats.gguf.imatrix import (Imatrix, ImatrixEntry, build_imatrix, read_imatrix, save_imatrix, to_legacy,
                                        write_imatrix)
from qtool.formats.gguf.writer import GGUFWriter
from qtool.model.resolve import open_source
from qtool.pipeline import run
from test_gguf_writer import build_tiny_mixtral
from tiny_models import build_tiny

T = gguf.GGMLQuantizationType


def linear_inputs(folder: Path) -> dict[str, int]:
    """HF weight name -> input width, for every 2-D weight inside the decoder blocks and lm_head."""
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_shape()[1] for k in f.keys()
                if k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2 and (".layers." in k or k.startswith("lm_head"))}


def random_stats(widths: dict[str, int], seed: int = 0, drop: tuple[str, ...] = ()) -> dict[str, tuple[torch.Tensor, int]]:
    """Σx² and token counts as `qtool calibrate` collects them, keyed by module name (no .weight)."""
    g = torch.Generator().manual_seed(seed)
    return {name.removesuffix(".weight"): (torch.rand(w, generator=g, dtype=torch.float64) * 50 + 0.01, 100 + i)
            for i, (name, w) in enumerate(sorted(widths.items())) if name not in drop}


def config_of(folder: Path) -> dict:
    import json

    return json.loads((folder / "config.json").read_text())


def export(folder: Path, out: Path, gguf_type: str, imatrix: Path | None = None) -> Path:
    with open_source(str(folder)) as src:
        run(str(folder), src, out, GGUFWriter(type=gguf_type, imatrix=imatrix), None, overwrite=True)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("imatrix-tiny")
    return {"llama": build_tiny("llama", root / "llama"), "mixtral": build_tiny_mixtral(root / "mixtral")}


# -- writing and reading --------------------------------------------------------------------------


def test_round_trip_maps_hf_names_to_gguf(tiny, tmp_path):
    folder = tiny["llama"]
    stats = random_stats(linear_inputs(folder))
    stats["model.layers.1.mlp.down_proj.weight"] = stats.pop("model.layers.1.mlp.down_proj")  # both spellings work
    path = tmp_path / "imatrix.gguf"
    write_imatrix(path, stats, config=config_of(folder), datasets=["wiki.txt"], chunks=4, chunk_size=128)
    imx = read_imatrix(path)
    assert not imx.legacy and imx.datasets == ["wiki.txt"] and (imx.chunk_count, imx.chunk_size) == (4, 128)
    expect = {f"blk.{b}.{n}.weight" for b in (0, 1)
              for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")} | {"output.weight"}
    assert set(imx.entries) == expect
    s, n = stats["model.layers.0.self_attn.k_proj"]
    e = imx.entries["blk.0.attn_k.weight"]
    assert e.sums.shape == (1, 96) and e.counts.tolist() == [n]
    assert np.array_equal(e.sums[0], s.float().numpy())
    np.testing.assert_array_equal(imx.importance("blk.0.attn_k.weight"), s.float().numpy() / np.float32(n))
    s, n = stats["model.layers.1.mlp.down_proj.weight"]
    assert np.array_equal(imx.entries["blk.1.ffn_down.weight"].sums[0], s.float().numpy())
    again = tmp_path / "again.gguf"
    save_imatrix(again, imx)
    assert again.read_bytes() == path.read_bytes()
    # a .dat path gets the legacy layout: mean x² times ncall (here ceil(most tokens / 128) = 1)
    dat = read_imatrix(write_imatrix(tmp_path / "i.dat", stats, config=config_of(folder), datasets=["wiki.txt"], chunks=4,
                                     chunk_size=128).path)
    assert dat.legacy and set(dat.entries) == expect and dat.chunk_count == 4 and dat.datasets == ["wiki.txt"]
    for name in expect:
        np.testing.assert_allclose(dat.importance(name), imx.importance(name), rtol=1e-6)


def test_round_trip_moe_experts_stacked(tiny, tmp_path):
    """Experts given one by one become one [n_expert, cols] entry; an expert that saw no token gets
    count 0, which llama-quantize reads as equal weights (1) for its columns. A fused expert tensor
    (`experts.gate_up_proj`, one row of sums per expert) feeds both gate_exps and up_exps."""
    folder = tiny["mixtral"]
    missing = "model.layers.0.block_sparse_moe.experts.2.w1.weight"
    stats = random_stats(linear_inputs(folder), drop=(missing,))
    write_imatrix(tmp_path / "m.gguf", stats, config=config_of(folder), datasets=[], chunks=2)
    imx = read_imatrix(tmp_path / "m.gguf")
    gate = imx.entries["blk.0.ffn_gate_exps.weight"]
    assert gate.sums.shape == (4, 96) and gate.counts[2] == 0 and (gate.counts[[0, 1, 3]] > 0).all()
    w = imx.importance("blk.0.ffn_gate_exps.weight").reshape(4, 96)
    assert (w[2] == 1).all()
    s, n = stats["model.layers.0.block_sparse_moe.experts.3.w1"]
    np.testing.assert_array_equal(w[3], s.float().numpy() / np.float32(n))
    assert imx.entries["blk.1.ffn_down_exps.weight"].sums.shape == (4, 64)
    assert "blk.0.ffn_gate_inp.weight" in imx.entries  # the router is a matmul too, as llama-imatrix records it
    assert imx.chunk_size == max(int(e.counts.max()) for e in imx.entries.values()) // 2

    fused = {"model.layers.0.mlp.experts.gate_up_proj": (torch.arange(8 * 16, dtype=torch.float32).reshape(8, 16), list(range(1, 9)))}
    cfg = {**config_of(build_tiny("qwen2_moe", tmp_path / "q")), "num_experts": 8}
    built = build_imatrix(tmp_path / "f.gguf", fused, config=cfg, datasets=[], chunks=1)
    assert set(built.entries) == {"blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight"}
    assert built.entries["blk.0.ffn_up_exps.weight"].counts.tolist() == list(range(1, 9))


def test_tied_lm_head_is_left_out(tiny, tmp_path):
    folder = tiny["llama"]
    stats = random_stats(linear_inputs(folder))
    imx = build_imatrix(tmp_path / "x.gguf", stats, config={**config_of(folder), "tie_word_embeddings": True}, datasets=[], chunks=1)
    assert "output.weight" not in imx.entries and "blk.0.attn_q.weight" in imx.entries


def test_legacy_layout_reads_and_rewrites(tmp_path):
    """The .dat layout: values stored as mean x² times ncall; the importance divides ncall out."""
    vals = np.array([[0.5, 2.0, 6.0, 1.5]], dtype=np.float32)
    imx = Imatrix(tmp_path / "a.dat", {"blk.0.attn_q.weight": ImatrixEntry(vals, np.array([3]))}, ["data.txt"], 3, 0, legacy=True)
    save_imatrix(tmp_path / "a.dat", imx)
    back = read_imatrix(tmp_path / "a.dat")
    assert back.legacy and back.datasets == ["data.txt"] and back.chunk_count == 3
    np.testing.assert_array_equal(back.importance("blk.0.attn_q.weight"), vals[0] / np.float32(3))
    save_imatrix(tmp_path / "b.dat", back)
    assert (tmp_path / "b.dat").read_bytes() == (tmp_path / "a.dat").read_bytes()


# -- quantizing with it ----------------------------------------------------------------------------


def tensors(path: Path) -> dict[str, tuple[T, np.ndarray]]:
    return {t.name: (t.tensor_type, np.array(t.data)) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("model", ["llama", "mixtral"])
def test_each_tensor_and_expert_gets_its_own_weights(tiny, tmp_path, model):
    """Reference: the F32 file's rows (GGUF order, Q/K permuted) quantized by quantize_tensor with
    that tensor's (that expert's) importance. Expert 2 of layer 0's gate has count 0 (weights 1)."""
    folder = tiny[model]
    drop = ("model.layers.0.block_sparse_moe.experts.2.w1.weight",) if model == "mixtral" else ()
    path = tmp_path / "i.gguf"
    write_imatrix(path, random_stats(linear_inputs(folder), drop=drop), config=config_of(folder), datasets=["t"], chunks=1)
    imx = read_imatrix(path)
    rows = tensors(export(folder, tmp_path / "f32.gguf", "F32"))
    ours = tensors(export(folder, tmp_path / "q.gguf", "Q4_0", path))
    checked = changed = 0
    for name, (qtype, data) in ours.items():
        if qtype not in quants.IMATRIX_SUPPORTED:
            continue
        x = torch.from_numpy(rows[name][1])
        w = torch.from_numpy(imx.importance(name)).reshape(-1, x.shape[-1]) if name in imx.entries else None
        mats = x.reshape(-1, *x.shape[-2:])
        ref = np.stack([quants.quantize_tensor(m, qtype, None if w is None else w[i]) for i, m in enumerate(mats)])
        assert np.array_equal(ref.reshape(data.shape), data), name
        plain = np.stack([quants.quantize_tensor(m, qtype) for m in mats])
        checked += 1
        changed += not np.array_equal(plain.reshape(data.shape), data)
    assert checked >= 14 and changed >= checked - 1  # the weights did change the rounding


def test_imatrix_only_rule_for_legacy_mixtures():
    """llama-quantize gives ffn_down of the first eighth of the layers Q4_1/Q5_1 under Q4_0/Q5_0,
    only when an imatrix is given; every other tensor keeps its type."""
    facts = mx.ModelFacts(n_layer=16, n_head=8, n_head_kv=8)
    shapes = {f"blk.{i}.{n}.weight": (512, 512) for i in range(16) for n in ("ffn_down", "attn_q")}
    conv = dict.fromkeys(shapes, T.F16)
    for mix, bumped in (("Q4_0", T.Q4_1), ("Q5_0", T.Q5_1)):
        plain = mx.plan_types(shapes, mx.MIXTURES[mix], facts, conv)
        with_imx = mx.plan_types(shapes, mx.MIXTURES[mix], facts, conv, has_imatrix=True)
        changed = {n: c.qtype for n, c in with_imx.items() if c != plain[n]}
        assert changed == {"blk.0.ffn_down.weight": bumped, "blk.1.ffn_down.weight": bumped}
    for mix in ("Q4_1", "Q5_1", "Q4_K_M", "Q8_0"):
        assert mx.plan_types(shapes, mx.MIXTURES[mix], facts, conv, has_imatrix=True) == mx.plan_types(shapes, mx.MIXTURES[mix], facts, conv)


# -- bad files -------------------------------------------------------------------------------------


def _good(folder: Path, path: Path) -> Imatrix:
    return build_imatrix(path, random_stats(linear_inputs(folder)), config=config_of(folder), datasets=["d"], chunks=1)


def _with(imx: Imatrix, name: str, sums: np.ndarray | None = None, counts: np.ndarray | None = None) -> Imatrix:
    e = imx.entries.get(name) or next(iter(imx.entries.values()))
    entries = {**imx.entries, name: ImatrixEntry(e.sums if sums is None else sums, e.counts if counts is None else counts)}
    return Imatrix(imx.path, entries, imx.datasets, imx.chunk_count, imx.chunk_size, imx.legacy)


def _bad_files(folder: Path, d: Path) -> dict[str, tuple[Path, str]]:
    """case -> (file, a word the message must hold besides the file name)."""
    good = _good(folder, d / "good.gguf")
    raw = save_imatrix(d / "good.gguf", good).read_bytes()
    cases: dict[str, tuple[Path, str]] = {}

    def put(case: str, data: bytes | Imatrix, word: str) -> None:
        p = d / f"{case}.imatrix"
        if isinstance(data, Imatrix):
            save_imatrix(p, data)
        else:
            p.write_bytes(data)
        cases[case] = (p, word)

    q = "blk.0.attn_q.weight"
    put("truncated", raw[: len(raw) * 2 // 3], "truncated")
    put("not-an-imatrix", b"this is a text file, not an importance matrix\n" * 4, "not an imatrix")
    put("nan", _with(good, q, sums=np.full((1, 96), np.nan, np.float32)), q)
    put("negative-count", _with(good, q, counts=np.array([-3])), q)
    put("wrong-length", _with(good, "blk.1.ffn_down.weight", sums=np.ones((1, 96), np.float32)), "blk.1.ffn_down.weight")
    put("not-in-model", _with(good, "blk.7.attn_q.weight"), "blk.7.attn_q.weight")
    legacy = Imatrix(good.path, {q: ImatrixEntry(good.entries[q].sums, np.array([1]))}, ["d"], 1, 0, legacy=True)
    put("legacy-truncated", save_imatrix(d / "l.dat", legacy).read_bytes()[:-200], "truncated")
    put("model-gguf", _gguf_with(d / "m.gguf", {"general.type": "model"}, {q + ".weight": np.ones((4, 96), np.float32)}), "general.type")
    meta = {"general.type": "imatrix", "imatrix.datasets": ["d"], "imatrix.chunk_count": 1, "imatrix.chunk_size": 8}
    put("sums-without-counts", _gguf_with(d / "s.gguf", meta, {q + ".in_sum2": np.ones(96, np.float32)}), ".counts")
    del meta["imatrix.chunk_size"]
    put("no-metadata", _gguf_with(d / "n.gguf", meta, {q + ".in_sum2": np.ones(96, np.float32), q + ".counts": np.ones(1, np.float32)}),
        "imatrix.chunk_size")
    return cases


def _gguf_with(path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """A GGUF file written by gguf-py (another writer than ours) with these keys and tensors."""
    w = gguf.GGUFWriter(str(path), arch="llama")
    for k, v in meta.items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, list):
            w.add_array(k, v)
        else:
            w.add_uint32(k, v)
    for name, a in arrays.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def qtool_proc(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env.pop("QTOOL_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "qtool", *map(str, args)], env=env, capture_output=True, text=True, timeout=120)


def test_bad_files_exit_5_in_one_line_nothing_written(tiny, tmp_path, cli):
    """Every case through the CLI in-process (exit code and message); two through a real process
    (one stderr line, no traceback). All are FormatErrors from the library too."""
    folder = tiny["llama"]
    cases = _bad_files(folder, tmp_path)
    out = tmp_path / "out" / "m.gguf"
    for case, (path, word) in cases.items():
        r = cli("export", folder, "-f", "gguf", "-t", "Q4_0", "--imatrix", path, "-o", out, "--quiet")
        assert r.exit_code == 5, (case, r.output)
        assert str(path) in r.output and word in r.output, (case, r.output)
        assert not out.exists() and not list(tmp_path.rglob("*qtool-partial*")), case
        with pytest.raises(FormatError):
            with open_source(str(folder)) as src:
                GGUFWriter(type="Q4_K_M", imatrix=path).plan(src)
    for case in ("truncated", "wrong-length"):
        p = qtool_proc("quantize", folder, "-f", "gguf", "-t", "Q4_K_M", "--imatrix", cases[case][0], "-o", out)
        err = p.stderr.strip()
        assert p.returncode == 5 and len(err.splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
        assert str(cases[case][0]) in err and cases[case][1] in err
        assert not out.exists()


def test_imatrix_is_a_gguf_only_option(tiny, tmp_path, cli):
    path = save_imatrix(tmp_path / "i.gguf", _good(tiny["llama"], tmp_path / "i.gguf"))
    r = cli("export", tiny["llama"], "-f", "safetensors", "--imatrix", path, "-o", tmp_path / "o")
    assert r.exit_code == 2 and "--imatrix" in r.output


# -- llama.cpp both ways ---------------------------------------------------------------------------

CHUNKS, CTX = 4, 128  # 4 chunks of 128 tokens: llama-imatrix takes ~4 s here


def run_tool(cmd: list, log: Path) -> None:
    with open(log, "w") as fh:
        rc = subprocess.run([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT).returncode
    assert rc == 0, f"{cmd[0]} failed (exit {rc}), log {log}:\n{log.read_text()[-3000:]}"


def hf_sum_x2(folder: Path, text: Path) -> dict[str, tuple[torch.Tensor, int]]:
    """What `qtool calibrate` collects: Σx² of every nn.Linear's input over CHUNKS windows of CTX
    tokens (the same windows llama-imatrix takes: the text's tokens from the start, no BOS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    stats: dict[str, list] = {}

    def hook(name):
        def fn(_, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            s = stats.setdefault(name, [0, 0])
            s[0], s[1] = s[0] + (x * x).sum(0), s[1] + x.shape[0]
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            mod.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for c in range(CHUNKS):
            model(torch.tensor([ids[c * CTX:(c + 1) * CTX]]))
    return {k: (v[0], v[1]) for k, v in stats.items()}


@pytest.fixture(scope="module")
def llama_runs(smollm2_dir, wikitext_path, tmp_path_factory):
    """Every llama.cpp run, once: imatrices of our BF16 file (GGUF and .dat), an imatrix qtool
    writes from its own statistics, and llama-quantize with each."""
    if os.environ.get("QTOOL_BUILD_LLAMA_CPP"):
        import llama_cpp_tools as lct

        tools = lct.ensure_llama_cpp(CACHE)
    else:
        lct = pytest.importorskip("llama_cpp_tools")
        tools = lct._tools_at(lct.key_dir(CACHE))
        if not (tools.imatrix.is_file() and tools.quantize.is_file()):
            pytest.skip(f"llama-imatrix / llama-quantize not built under {lct.key_dir(CACHE)} (make llama-cpp)")
    d = tmp_path_factory.mktemp("imatrix-llama")
    text = d / "calib.txt"
    text.write_text(wikitext_path.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    bf16 = export(smollm2_dir, d / "smollm2-BF16.gguf", "BF16")
    runs = {"bf16": bf16, "text": text, "dir": d}
    for fmt in ("gguf", "dat"):
        runs[fmt] = d / f"imatrix.{fmt}"
        run_tool([tools.imatrix, "-m", bf16, "-f", text, "-o", runs[fmt], "--output-format", fmt, "-c", CTX,
                  "--chunks", CHUNKS, "-t", 2, "--no-ppl"], d / f"imatrix-{fmt}.log")
    runs["ours"] = d / "ours.imatrix.gguf"
    runs["stats"] = hf_sum_x2(smollm2_dir, text)
    write_imatrix(runs["ours"], runs["stats"], config=config_of(smollm2_dir), datasets=[str(text)], chunks=CHUNKS, chunk_size=CTX)
    for key, imx, mix in (("Q4_K_M", "gguf", "Q4_K_M"), ("Q5_0", "dat", "Q5_0"), ("ours-Q4_K_M", "ours", "Q4_K_M")):
        runs[f"theirs-{key}"] = tools.quantize_gguf(bf16, d / f"theirs-{key}.gguf", mix, "--imatrix", str(runs[imx]))
    runs["theirs-plain-Q4_K_M"] = tools.quantize_gguf(bf16, d / "theirs-plain-Q4_K_M.gguf", "Q4_K_M")
    return runs


def table(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def imatrix_keys(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: (f.types, f.contents()) for k, f in r.fields.items() if k.startswith("quantize.imatrix.")}


@pytest.mark.slow
def test_reads_llama_imatrix_files(llama_runs):
    g, d = read_imatrix(llama_runs["gguf"]), read_imatrix(llama_runs["dat"])
    linear = {t.name for t in gguf.GGUFReader(llama_runs["bf16"]).tensors
              if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2}
    assert set(g.entries) == set(d.entries) == linear  # llama-imatrix records the blocks' matmuls only
    assert (g.chunk_count, g.chunk_size, d.chunk_count) == (CHUNKS, CTX, CHUNKS)
    assert g.datasets == d.datasets == [str(llama_runs["text"])]
    assert all((e.counts == CHUNKS * CTX).all() for e in g.entries.values())
    # .dat stores mean x² times ncall (= 4 chunks) and the reader divides it out: exact with a power of two
    assert all(np.array_equal(g.importance(n), d.importance(n)) for n in g.entries)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gguf", "dat", "gguf-as-dat"])
def test_rewrites_llama_imatrix_byte_for_byte(llama_runs, tmp_path, fmt):
    """Read and written back, each file is unchanged; and the GGUF statistics converted to the .dat
    layout are llama-imatrix's own .dat file of the same run."""
    src = llama_runs[fmt.split("-")[0]]
    imx = read_imatrix(src)
    if fmt == "gguf-as-dat":
        imx, src = to_legacy(imx), llama_runs["dat"]
    out = save_imatrix(tmp_path / "again", imx)
    assert out.read_bytes() == src.read_bytes()


@pytest.mark.slow
def test_our_statistics_agree_with_llama_imatrix(llama_runs, smollm2_dir):
    """The same 4 x 128 tokens through transformers (float32) and llama.cpp (BF16 weights): each
    tensor's importance agrees closely (measured median relative difference <= 0.3%), which
    a name mapped to the wrong layer (14%) or projection (65%) would not."""
    ours = build_imatrix("x", llama_runs["stats"], config=config_of(smollm2_dir), datasets=[], chunks=CHUNKS)
    theirs = read_imatrix(llama_runs["gguf"])
    assert set(ours.entries) == set(theirs.entries)
    for name in theirs.entries:
        a, b = ours.importance(name), theirs.importance(name)
        assert np.median(np.abs(a - b) / np.maximum(b, 1e-6)) < 0.05, name


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    a, b = table(ours), table(theirs)
    assert {n: t for n, (t, _) in a.items()} == {n: t for n, (t, _) in b.items()}
    differ = [n for n in a if a[n][1] != b[n][1]]
    assert differ == [], f"{len(differ)} of {len(a)} tensors differ in bytes, e.g. {differ[:3]}"


@pytest.mark.slow
@pytest.mark.parametrize("mixture,fmt", [("Q4_K_M", "gguf"), ("Q5_0", "dat")])
def test_same_file_as_llama_quantize_with_its_imatrix(llama_runs, smollm2_dir, tmp_path, cli, mixture, fmt):
    out = tmp_path / "ours.gguf"
    r = cli("export", smollm2_dir, "-f", "gguf", "-t", mixture, "--imatrix", llama_runs[fmt], "-o", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert f"imatrix {llama_runs[fmt]}: 210 entries" in " ".join(r.output.split())
    theirs = llama_runs[f"theirs-{mixture}"]
    assert_same_tensors(out, theirs)
    assert imatrix_keys(out) == imatrix_keys(theirs) != {}
    if mixture == "Q5_0":  # the imatrix-only rule: ffn_down of layers 0..3 (30 // 8) in Q5_1
        assert sorted(n for n, (t, _) in table(out).items() if t == "Q5_1") == [f"blk.{i}.ffn_down.weight" for i in range(3)]


@pytest.mark.slow
def test_llama_quantize_takes_our_imatrix(llama_runs, smollm2_dir, tmp_path):
    theirs = llama_runs["theirs-ours-Q4_K_M"]
    ours = export(smollm2_dir, tmp_path / "ours.gguf", "Q4_K_M", llama_runs["ours"])
    assert_same_tensors(ours, theirs)
    plain = table(llama_runs["theirs-plain-Q4_K_M"])
    weighted = [n for n, (t, data) in table(theirs).items() if t in ("Q4_K", "Q5_0", "Q6_K") and data != plain[n][1]]
    assert len(weighted) >= 190  # the imatrix was in effect: 196 tensors take it, (nearly) all change
