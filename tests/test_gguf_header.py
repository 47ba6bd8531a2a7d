"""The fast GGUF header reader (`qtool.model.gguf_header`) against gguf-py's `GGUFReader`: the same
metadata values and tensor table on a file with every value type and on the real SmolLM2 GGUF;
the same refusals on corrupted files; and the cost on a 262k-token vocabulary (headers only)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from qtool.errors import FormatError, UnsupportedError
from qtool.model.gguf_header import SUPPORTED_VERSIONS, GGUFArray, GGUFHeader, file_type_name, ggml_type, gguf_constants
from qtool.model.smollm2 import ensure_smollm2_gguf

REPO = Path(__file__).resolve().parents[1]


def write_gguf(path: Path, vocab: int = 5, endianess=gguf.GGUFEndian.LITTLE) -> Path:
    """Every GGUF value type, arrays of each, a unicode string, and tensors of three GGML types."""
    w = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    w.add_block_count(2)
    w.add_head_count([4, 4])  # a per-layer array (some architectures write these)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_uint8("t.u8", 250)
    w.add_int8("t.i8", -3)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -30000)
    w.add_int32("t.i32", -(2**31))
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -(2**63))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.floats", [0.5, -1.25, 3.0])
    w.add_array("t.ints", [1, -2, 3])
    w.add_token_list([f"tok{i}·" for i in range(vocab)])
    w.add_token_scores([float(-i) for i in range(vocab)])
    w.add_token_merges(["t o", "k 1"])
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", gguf.quants.quantize(rng.standard_normal((8, 64)).astype(np.float32),
                                                           gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(64).astype(np.float32))
    w.add_tensor("output.weight", rng.standard_normal((8, 64)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def assert_same_as_gguf_py(path: Path) -> GGUFHeader:
    mine, ref = GGUFHeader(path), gguf.GGUFReader(path)
    assert list(mine.fields) == [k for k in ref.fields if not k.startswith("GGUF.")]  # gguf-py's own pseudo-keys
    for key in mine.fields:
        a, b = mine.get(key), ref.fields[key].contents()
        assert a == b and type(a) is type(b), key
        if isinstance(a, list):
            assert [type(x) for x in a] == [type(x) for x in b], key
            assert mine.count(key) == len(b)
    assert mine.data_offset == ref.data_offset
    assert len(mine.tensors) == len(ref.tensors)
    for t, r in zip(mine.tensors, ref.tensors):
        assert (t.name, t.type_id, t.type_name, t.dims, t.offset, t.n_bytes, t.n_elements) == (
            r.name, int(r.tensor_type), r.tensor_type.name, tuple(int(d) for d in r.shape), int(r.data_offset),
            int(r.n_bytes), int(r.n_elements))
    return mine


def test_same_values_and_tensors_as_gguf_py(tmp_path):
    h = assert_same_as_gguf_py(write_gguf(tmp_path / "all.gguf"))
    assert isinstance(h.fields["tokenizer.ggml.tokens"], GGUFArray)  # kept as a span until asked for
    assert h.get("t.str") == "héllo ✓" and h.count("tokenizer.ggml.tokens") == 5 and h.count("t.str") is None
    assert h.tensors[0].shape == (8, 64)


@pytest.mark.slow
def test_same_as_gguf_py_on_the_real_model():
    assert_same_as_gguf_py(ensure_smollm2_gguf(Path(os.environ.get("QTOOL_CACHE", REPO / ".cache"))))


def test_tables_are_gguf_pys():
    """The GGML type and file-type tables come from gguf-py's constants module, loaded on its own."""
    assert gguf_constants() is not gguf.constants  # the standalone copy, not the imported package's
    for t in gguf.GGMLQuantizationType:
        assert ggml_type(int(t)) == (t.name, *gguf.GGML_QUANT_SIZES[t])
    assert ggml_type(9999) is None
    assert file_type_name(int(gguf.LlamaFileType.MOSTLY_Q4_K_M)) == "Q4_K_M"
    assert file_type_name(int(gguf.LlamaFileType.ALL_F32)) == "F32" and file_type_name(9999) is None
    from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

    assert list(SUPPORTED_VERSIONS) == list(READER_SUPPORTED_VERSIONS)


# -- bad input: the same words as gguf_source's checked reader (tests/test_gguf_source.py) ----------


def _field_offset(reader, key: str) -> int:
    return int(reader.fields[key].offset)


def _tensor_info_end(reader, index: int) -> int:
    field = reader.tensors[index].field
    return field.offset + sum(int(p.nbytes) for p in field.parts)


def _corrupt(data: bytearray, reader, case: str) -> bytearray:
    if case == "bad magic":
        data[0:4] = b"GGML"
    elif case == "unknown version":
        data[4:8] = struct.pack("<I", 99)
    elif case == "truncated header":
        del data[_field_offset(reader, "llama.block_count") + 5:]
    elif case == "truncated tensor data":
        del data[-100:]
    elif case == "tensor offset past end":
        end = _tensor_info_end(reader, 2)
        data[end - 8:end] = struct.pack("<Q", 1 << 40)
    elif case == "unknown tensor type":
        end = _tensor_info_end(reader, 1)
        data[end - 12:end - 8] = struct.pack("<I", 99)
    elif case == "string longer than file":
        at = _field_offset(reader, "general.architecture") + 8 + len("general.architecture") + 4
        data[at:at + 8] = struct.pack("<Q", 1 << 40)
    elif case == "string array longer than file":
        at = _field_offset(reader, "tokenizer.ggml.tokens") + 8 + len("tokenizer.ggml.tokens") + 4 + 4
        data[at:at + 8] = struct.pack("<Q", 1 << 40)  # the element count
    elif case == "empty file":
        del data[:]
    return data


BAD_CASES = {
    "bad magic": "magic",
    "unknown version": "version 99",
    "truncated header": "truncated",
    "truncated tensor data": "past the end",
    "tensor offset past end": "past the end",
    "unknown tensor type": "type id 99",
    "string longer than file": "claims 1099511627776 bytes",
    "string array longer than file": "past the end",
    "empty file": "only 0 bytes",
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_format_error(case, tmp_path):
    good = write_gguf(tmp_path / "good.gguf")
    bad = tmp_path / f"{case.replace(' ', '-')}.gguf"
    bad.write_bytes(_corrupt(bytearray(good.read_bytes()), gguf.GGUFReader(good), case))
    with pytest.raises(FormatError) as err:
        GGUFHeader(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    assert BAD_CASES[case] in str(err.value)


def test_a_bad_utf8_value_fails_when_read_naming_the_key(tmp_path):
    good = write_gguf(tmp_path / "good.gguf")
    data = bytearray(good.read_bytes())
    at = data.index("héllo".encode())
    data[at:at + 2] = b"\xff\xfe"
    bad = tmp_path / "utf8.gguf"
    bad.write_bytes(data)
    h = GGUFHeader(bad)  # the rest of the header is still readable
    assert h.get("general.architecture") == "llama"
    with pytest.raises(FormatError, match="'t.str'"):
        h.get("t.str")


def test_big_endian_is_unsupported(tmp_path):
    with pytest.raises(UnsupportedError, match="big-endian"):
        GGUFHeader(write_gguf(tmp_path / "be.gguf", endianess=gguf.GGUFEndian.BIG))


# -- cost: a 262k-token vocabulary (Gemma 3's size) ---------------------------------------------------

MEASURE = """
import json, resource, sys, time
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.process_time()
from qtool.inspect import inspect_model
r = inspect_model(sys.argv[1])
cpu = time.process_time() - t0
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'datasets', 'gguf', 'numpy'})
print(json.dumps({"cpu": cpu, "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base,
                  "vocab": r.metadata["tokenizer"]["vocab_size"], "heavy": heavy}))
"""


def test_inspect_of_a_262k_vocabulary_reads_headers_only(tmp_path):
    path = write_gguf(tmp_path / "big-vocab.gguf", vocab=262_144)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["vocab"] == 262_144
    assert got["heavy"] == []  # no torch, transformers, datasets, gguf-py or numpy for a header
    # measured ~0.25 s of CPU and ~10 MB here (gguf-py's reader: ~40 s, ~1 GB); the bounds leave
    # room for a slow, loaded CI machine, the targets are 1 s wall and 150 MB
    assert got["rss_kb"] < 150 * 1024, got
    assert got["cpu"] < 2.0, got
