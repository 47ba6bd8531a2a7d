"""Hardened readers: mutated safetensors headers, GGUF files, config.json files, calibration
statistics and imatrix files thrown at `inspect`, `export` and `quantize --dry-run` (what the CLI
calls: model inputs as the model, statistics as `-m gptq --stats`, imatrix files as `-f gguf
--imatrix`). Each input must give a result (a dry run: a plan, refusals inside it) or a typed qtool
error (a one-line message and an exit code), never another exception, never a hang past a second,
never an output left behind (a dry run's scratch folder included). The count run is printed.

Mutations are drawn by hypothesis (seeded: the same inputs every run): byte flips, truncations,
insertions and splices of a valid seed file, and for the JSON parts structural edits (a value
replaced by another type, a huge number, a negative offset, a missing key).
"""

from __future__ import annotations

import json
import shutil
import signal
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtool.errors import QtoolError

import os

EXAMPLES = {"safetensors": 2500, "gguf": 2500, "config": 2000, "stats": 1500, "imatrix": 1500}  # 10,000 in all
SCALE = float(os.environ.get("QTOOL_FUZZ_SCALE", "1"))  # a quick local look: QTOOL_FUZZ_SCALE=0.05
COUNTS: dict[str, int] = {}
HANG_S = 1.0


# -- seeds ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seeds(tmp_path_factory, tiny_byte_llama, wiki_sample):
    from conftest import invoke_cli

    root = tmp_path_factory.mktemp("fuzz-seeds")
    stats, imx = root / "stats.safetensors", root / "imatrix.gguf"
    r = invoke_cli("calibrate", tiny_byte_llama, "--dataset", wiki_sample, "--samples", "2", "--seq-len", "16",
                   "-o", stats, "--imatrix", imx, "-q")
    assert r.exit_code == 0, r.output
    return {
        "model": tiny_byte_llama,
        "safetensors": (tiny_byte_llama / "model.safetensors").read_bytes(),
        "config": (tiny_byte_llama / "config.json").read_bytes(),
        "gguf": _small_gguf(root / "seed.gguf"),
        "stats": stats.read_bytes(),
        "imatrix": imx.read_bytes(),
    }


def _small_gguf(path: Path) -> bytes:
    """A valid little GGUF (llama metadata, a vocab array, an F32 and a Q8_0 tensor), written by gguf-py."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_head_count(2)
    w.add_token_list([f"t{i}" for i in range(40)])
    w.add_token_scores([0.0] * 40)
    w.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((40, 32)).astype(np.float32))
    q8 = gguf.quants.quantize(np.random.default_rng(1).standard_normal((32, 32)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


# -- mutations --------------------------------------------------------------------------------------
def _mutate(data: bytes, ops: list[tuple[int, int, int]], cut: int | None, header_only: int) -> bytes:
    """Byte-level edits concentrated in the first `header_only` bytes (where readers parse)."""
    buf = bytearray(data)
    for kind, pos, val in ops:
        if not buf:
            break
        p = pos % max(1, min(header_only, len(buf)))  # the buffer shrinks as bytes are deleted
        if kind == 0:
            buf[p] = val & 0xFF  # overwrite
        elif kind == 1:
            buf[p:p] = bytes([val & 0xFF]) * (1 + val % 7)  # insert
        elif kind == 2:
            del buf[p:p + 1 + val % 16]  # delete
        else:
            buf[p:p + 8] = struct.pack("<q", (val << 20) - (1 << 40))  # a wild 64-bit length/offset
    if cut is not None:
        buf = buf[: cut % (len(buf) + 1)]
    return bytes(buf)


OPS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 20), st.integers(0, 1 << 16)), min_size=1, max_size=6)
CUT = st.one_of(st.none(), st.integers(0, 1 << 20))
WILD = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 62), 1 << 62), st.floats(allow_nan=True), st.text(max_size=8),
                 st.lists(st.integers(-3, 1 << 40), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _json_edit(obj: dict, key_pick: int, value, drop: bool) -> dict:
    keys = sorted(obj)
    if not keys:
        return obj
    k = keys[key_pick % len(keys)]
    out = dict(obj)
    if drop:
        out.pop(k)
    elif isinstance(out[k], dict) and out[k]:
        inner = sorted(out[k])
        out[k] = {**out[k], inner[key_pick % len(inner)]: value}
    else:
        out[k] = value
    return out


def _safetensors_with_header(data: bytes, header: dict) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data[8 + n:]


# -- the oracle -------------------------------------------------------------------------------------
class _Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Hang


def _check(kind: str, path: Path, out: Path, export: bool = False, dry: dict | None = None) -> None:
    """inspect (and export, for model inputs; a dry run with `dry`, quantize's keywords): a result or
    a QtoolError; under HANG_S; nothing left."""
    from qtool.inspect import calibration_file_summary, inspect_model

    COUNTS[kind] = COUNTS.get(kind, 0) + 1
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_S * 5)  # generous: a loaded CI machine; hangs are minutes
    try:
        try:
            if calibration_file_summary(str(path)) is None:
                inspect_model(str(path))
        except QtoolError:
            pass
        if export:
            _export(path, out)
        if dry is not None:
            _dry_run(out, **dry)
    except _Hang:
        pytest.fail(f"{kind}: a reader hung on {path} (kept for inspection)")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _export(path: Path, out: Path) -> None:
    import torch

    from qtool.formats.safetensors_plain import SafetensorsWriter
    from qtool.model.resolve import open_source
    from qtool.pipeline import run

    try:
        with open_source(str(path)) as src:
            run(str(path), src, out, SafetensorsWriter(torch.bfloat16), None, overwrite=True, hash_inputs=False)
    except QtoolError:
        assert not out.exists(), f"{out} left behind after an error"
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _dry_run(out: Path, model: Path, fmt: str = "compressed-tensors", **recipe) -> None:
    """`qtool quantize MODEL ... -o OUT --dry-run` as the CLI runs it: flags, writers, the plan."""
    import tempfile

    from qtool.config import make_recipe
    from qtool.dryrun import DryRunReport, dry_run
    from qtool.pipeline import validate_formats

    COUNTS["dry-run"] = COUNTS.get("dry-run", 0) + 1
    imatrix = recipe.pop("imatrix", None)
    scratch = set(Path(tempfile.gettempdir()).glob("qtool-dry-run-*"))
    try:
        r = make_recipe(**{"method": "rtn", "bits": 4, "qtype": None, "group_size": "32" if fmt != "gguf" else None,
                           "asym": None, "fmt": fmt, **recipe})
        writers = validate_formats(r, fmt, **({"type": "Q8_0", "imatrix": imatrix} if fmt == "gguf" else {}))
        assert isinstance(dry_run(str(model), r, writers, [out]), DryRunReport)
    except QtoolError:
        pass
    assert not out.exists(), f"{out} written by a dry run"
    assert set(Path(tempfile.gettempdir()).glob("qtool-dry-run-*")) == scratch, "a dry run left its scratch folder"


FUZZ = settings(max_examples=1, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck), print_blob=True)


def _fuzz(kind: str, strategy, body):
    @settings(FUZZ, max_examples=max(1, int(EXAMPLES[kind] * SCALE)))
    @given(strategy)
    def run(args):
        body(*args)

    run()


def test_fuzz_safetensors_headers(seeds, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_bytes(seeds["config"])
    data = seeds["safetensors"]
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])

    def body(ops, cut, edit):
        key_pick, value, drop, structural = edit
        raw = _safetensors_with_header(data, _json_edit(header, key_pick, value, drop)) if structural else _mutate(data, ops, cut, 8 + n)
        (folder / "model.safetensors").write_bytes(raw)
        _check("safetensors", folder, tmp_path / "out", export=structural or key_pick % 8 == 0, dry={"model": folder})

    _fuzz("safetensors", st.tuples(OPS, CUT, st.tuples(st.integers(0, 1000), WILD, st.booleans(), st.booleans())), body)


def test_fuzz_gguf_files(seeds, tmp_path):
    path = tmp_path / "m.gguf"

    def body(ops, cut, export):
        path.write_bytes(_mutate(seeds["gguf"], ops, cut, 2048))
        _check("gguf", path, tmp_path / "out", export=export, dry={"model": path})

    _fuzz("gguf", st.tuples(OPS, CUT, st.booleans()), body)


def test_fuzz_config_json(seeds, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(seeds["safetensors"])
    config = json.loads(seeds["config"])

    def body(ops, cut, edit):
        key_pick, value, drop, structural = edit
        raw = json.dumps(_json_edit(config, key_pick, value, drop)).encode() if structural else _mutate(seeds["config"], ops, cut, 4096)
        (folder / "config.json").write_bytes(raw)
        _check("config", folder, tmp_path / "out", export=key_pick % 4 == 0, dry={"model": folder})

    _fuzz("config", st.tuples(OPS, CUT, st.tuples(st.integers(0, 1000), WILD, st.booleans(), st.booleans())), body)


@pytest.mark.parametrize("kind, name", [("stats", "stats.safetensors"), ("imatrix", "imatrix.gguf")])
def test_fuzz_calibration_files(seeds, tmp_path, kind, name):
    path = tmp_path / name
    data = seeds[kind]
    head = 8 + struct.unpack("<Q", data[:8])[0] if kind == "stats" else 4096

    as_flag = {"stats": {"method": "gptq", "stats": str(path)}, "imatrix": {"fmt": "gguf", "imatrix": str(path)}}[kind]

    def body(ops, cut):
        path.write_bytes(_mutate(data, ops, cut, head))
        _check(kind, path, tmp_path / "out", dry={"model": seeds["model"], **as_flag})

    _fuzz(kind, st.tuples(OPS, CUT), body)


def test_fuzz_count(capsys):
    """Runs last in this file: the count of inputs thrown, printed (pytest -s shows it; -ra keeps it)."""
    total = sum(v for k, v in COUNTS.items() if k in EXAMPLES)
    with capsys.disabled():
        print(f"\nfuzzed readers with {total} mutated inputs ({COUNTS.get('dry-run', 0)} through quantize --dry-run): {COUNTS}")
    inputs = sum(v for k, v in COUNTS.items() if k in EXAMPLES)
    if len(COUNTS) > len(EXAMPLES) and SCALE >= 1:
        assert inputs >= 10_000 and COUNTS["dry-run"] >= 10_000
