"""Bad input through the real CLI process: the documented exit code (qtool/errors.py: 2 usage,
3 unsupported, 4 numerical, 5 I/O or format), ONE line on stderr naming the file / tensor / option,
no traceback unless `--debug`, and nothing left behind (neither the output nor a
`.NAME.qtool-partial-PID` temporary beside it).

Failures run `python -m qtool` in a subprocess, because the process's own exit status and stderr are
what is promised. The accepted variants (`-g channel`, `--overwrite`, `--allow-pickle`...) only need
to succeed, so they run in-process (CliRunner) to keep the file fast. An exception or Ctrl-C in the
middle of writing is provoked in-process, in `qtool.pipeline.run`.
"""

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
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qtool.cli.main import app
from tiny_models import build_tiny

VICTIM = "model.layers.1.self_attn.v_proj.weight"  # the tensor the NaN/Inf cases damage


# -- helpers --------------------------------------------------------------------------------------
def qtool(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    env.pop("QTOOL_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "qtool", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def assert_fails(p: subprocess.CompletedProcess, code: int, *names: str) -> str:
    """Exit `code`, one stderr line that mentions every one of `names`, no traceback."""
    err = p.stderr.strip()
    assert p.returncode == code, f"exit {p.returncode}, expected {code}; stderr:\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    assert len(err.splitlines()) == 1, f"stderr is not one line:\n{p.stderr}"
    for n in names:
        assert str(n) in err, f"{n!r} not in: {err}"
    return err


def assert_nothing_left(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    if out.parent.exists():
        partial = [p.name for p in out.parent.iterdir() if ".qtool-partial-" in p.name]
        assert not partial, f"temporaries left behind: {partial}"


def cli_ok(*args: object) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("bad_input") / "llama")


def copy_model(src: Path, dst: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """`src` as a new folder; `tensors` replaces model.safetensors' contents when given."""
    dst.mkdir(parents=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors if tensors is not None else load_file(src / "model.safetensors"), dst / "model.safetensors")
    return dst


def write_gguf(path: Path) -> Path:
    """A small valid GGUF (llama metadata, two F32 tensors) written with gguf-py."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((64, 32)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- input that is not there or not a model ------------------------------------------------------
def test_missing_path(tmp_path):
    out = tmp_path / "out"
    p = qtool("quantize", tmp_path / "no-such-model", "-o", out, cwd=tmp_path)
    assert_fails(p, 5, "no-such-model")
    assert_nothing_left(out)


def test_folder_without_config(llama, tmp_path):
    src = tmp_path / "noconfig"
    src.mkdir()
    (src / "model.safetensors").write_bytes((llama / "model.safetensors").read_bytes())
    out = tmp_path / "out"
    assert_fails(qtool("quantize", src, "-o", out, cwd=tmp_path), 5, "noconfig", "config.json")
    assert_nothing_left(out)


# -- damaged safetensors ---------------------------------------------------------------------------
def _damage_truncated_header(raw: bytes) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[: 8 + n // 2]  # the file ends in the middle of the JSON header


def _damage_garbage_header(raw: bytes) -> bytes:
    junk = b'{"model.embed_tokens.weight": {"dtype": "BF16", "shape": [256, 96], "data_offs'  # cut JSON
    junk += b"\x00\xff garbage \xfe" * 4
    return struct.pack("<Q", len(junk)) + junk + raw[8 + struct.unpack("<Q", raw[:8])[0] :]


def _damage_offsets_past_end(raw: bytes) -> bytes:
    return raw[:-1000]  # the header is intact, but its last tensors' offsets point past the end


@pytest.mark.parametrize(
    "damage, words",
    [
        pytest.param(_damage_truncated_header, "header", id="truncated-header"),
        pytest.param(_damage_garbage_header, "header", id="garbage-json-header"),
        pytest.param(_damage_offsets_past_end, "truncated", id="offsets-past-end"),
    ],
)
def test_damaged_safetensors(damage, words, llama, tmp_path):
    src = copy_model(llama, tmp_path / "damaged")
    weights = src / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    out = tmp_path / "out"
    assert_fails(qtool("quantize", src, "-o", out, cwd=tmp_path), 5, weights, words)
    assert_nothing_left(out)


# -- damaged GGUF ---------------------------------------------------------------------------------
def test_gguf_bad_magic(tmp_path):
    path = write_gguf(tmp_path / "bad-magic.gguf")
    raw = bytearray(path.read_bytes())
    raw[:4] = b"GGUX"
    path.write_bytes(bytes(raw))
    out = tmp_path / "out"
    assert_fails(qtool("quantize", path, "-o", out, cwd=tmp_path), 5, "bad-magic.gguf", "magic")
    assert_nothing_left(out)


def test_gguf_truncated_tensor_data(tmp_path):
    path = write_gguf(tmp_path / "truncated.gguf")
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])  # the last tensor (output_norm, 128 bytes) loses most of its data
    out = tmp_path / "out"
    assert_fails(qtool("quantize", path, "-o", out, cwd=tmp_path), 5, "truncated.gguf", "output_norm.weight")
    assert_nothing_left(out)


# -- a model qtool does not handle, or a damaged weight ------------------------------------------
def test_unsupported_architecture(llama, tmp_path):
    src = copy_model(llama, tmp_path / "bert-like")
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="bert", architectures=["BertForMaskedLM"])
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    # an encoder: transformers has a BERT LM head, but the checkpoint says it is a masked LM
    assert_fails(qtool("quantize", src, "-o", out, cwd=tmp_path), 3, "bert", "BertForMaskedLM", "no decoder-block structure")
    assert_nothing_left(out)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weight(bad, llama, tmp_path):
    tensors = load_file(llama / "model.safetensors")
    tensors[VICTIM][3, 5] = bad  # in block 1: block 0 has already been streamed into the output
    src = copy_model(llama, tmp_path / "damaged", tensors)
    out = tmp_path / "out"
    assert_fails(qtool("quantize", src, "-o", out, cwd=tmp_path), 4, VICTIM)
    assert_nothing_left(out)


def test_debug_shows_the_traceback(llama, tmp_path):
    tensors = load_file(llama / "model.safetensors")
    tensors[VICTIM][0, 0] = float("nan")
    src = copy_model(llama, tmp_path / "damaged", tensors)
    out = tmp_path / "out"
    p = qtool("--debug", "quantize", src, "-o", out, cwd=tmp_path)
    assert p.returncode != 0
    assert "Traceback" in p.stderr and "NumericalError" in p.stderr and VICTIM in p.stderr, p.stderr
    assert_nothing_left(out)  # --debug changes what is printed, not the cleanup


# -- options ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("g", ["0", "-5"], ids=["g0", "g-5"])
def test_bad_group_size(g, llama, tmp_path):
    out = tmp_path / "out"
    assert_fails(qtool("quantize", llama, "-g", g, "-o", out, cwd=tmp_path), 2, "--group-size", g)
    assert_nothing_left(out)


@pytest.mark.parametrize("g", ["channel", "-1"], ids=["channel", "-1"])
def test_per_channel_spellings_work(g, llama, tmp_path):
    cli_ok("quantize", llama, "-g", g, "-o", tmp_path / "out", "--quiet")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    strategies = {grp["weights"]["strategy"] for grp in config["quantization_config"]["config_groups"].values()}
    assert strategies == {"channel"}


@pytest.mark.parametrize(
    "option, value, valid",
    [("--method", "nope", "rtn"), ("--format", "nope", "compressed-tensors")],
    ids=["method", "format"],
)
def test_unknown_names_list_the_valid_ones(option, value, valid, llama, tmp_path):
    out = tmp_path / "out"
    assert_fails(qtool("quantize", llama, option, value, "-o", out, cwd=tmp_path), 2, value, valid)
    assert_nothing_left(out)


def test_asym_fp8(llama, tmp_path):
    out = tmp_path / "out"
    assert_fails(qtool("quantize", llama, "--qtype", "fp8", "--asym", "-o", out, cwd=tmp_path), 2, "--asym", "fp8")
    assert_nothing_left(out)


def test_strict_groups_names_the_layer_and_the_sizes_that_work(llama, tmp_path):
    out = tmp_path / "out"
    p = qtool("quantize", llama, "-g", "64", "--strict-groups", "-o", out, cwd=tmp_path)
    # the first layer 64 does not divide, in file order: down_proj (input width 160 = 32 * 5)
    assert_fails(p, 3, "model.layers.0.mlp.down_proj", "160", "64", "16, 32")
    assert_nothing_left(out)


def test_existing_output(llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_fails(qtool("quantize", llama, "-o", out, cwd=tmp_path), 5, out, "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"  # untouched
    assert not [p for p in tmp_path.iterdir() if ".qtool-" in p.name]
    cli_ok("quantize", llama, "-o", out, "--overwrite", "--quiet")
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if ".qtool-" in p.name]


def test_pickle_only_folder(llama, tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_text((llama / "config.json").read_text())
    torch.save(load_file(llama / "model.safetensors"), src / "pytorch_model.bin")
    out = tmp_path / "out"
    assert_fails(qtool("quantize", src, "-o", out, cwd=tmp_path), 5, "pytorch_model.bin", "--allow-pickle")
    assert_nothing_left(out)
    cli_ok("quantize", src, "--allow-pickle", "-o", out, "--quiet")
    assert (out / "model.safetensors").is_file()


# -- interrupted in the middle of writing (in-process) ------------------------------------------
@pytest.mark.parametrize(
    "exc, expected",
    [(OSError(28, "No space left on device"), "FormatError"), (RuntimeError("bug"), "RuntimeError"), (KeyboardInterrupt(), "KeyboardInterrupt")],
    ids=["disk-full", "error", "ctrl-c"],
)
def test_interrupted_write_leaves_nothing(exc, expected, llama, tmp_path, monkeypatch):
    """A failed write (an OSError becomes a one-line FormatError), a bug or Ctrl-C: nothing left behind."""
    from qtool.config import make_recipe
    from qtool.formats.compressed_tensors import CompressedTensorsWriter
    from qtool.model.resolve import open_source
    from qtool.pipeline import run, validate_early

    calls = {"n": 0}
    original = CompressedTensorsWriter.add_quantized

    def add_then_fail(self, name, qw):
        calls["n"] += 1
        if calls["n"] > 3:  # three layers are already in the temporary file
            raise exc
        return original(self, name, qw)

    monkeypatch.setattr(CompressedTensorsWriter, "add_quantized", add_then_fail)
    recipe = make_recipe(method="rtn", bits=4, qtype=None, group_size="32", asym=False, fmt="compressed-tensors")
    writer = validate_early(recipe, "compressed-tensors")
    out = tmp_path / "out"
    with open_source(str(llama)) as source, pytest.raises(BaseException) as info:
        run(str(llama), source, out, writer, recipe)
    assert type(info.value).__name__ == expected
    assert calls["n"] == 4
    assert_nothing_left(out)
