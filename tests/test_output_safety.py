"""Outputs appear only when complete: a full disk or an unwritable destination is a one-line error
(exit 5) and leaves nothing behind, for every format."""

from __future__ import annotations

import errno

import pytest
from typer.testing import CliRunner

from qtool.cli.main import app
from tiny_models import build_tiny

FORMATS = [("compressed-tensors", ["-b", "4", "-g", "32"], "q"), ("gguf", ["-t", "Q8_0"], "q.gguf"), ("gptq", ["-b", "4", "-g", "32"], "q")]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("safety") / "llama")


@pytest.mark.parametrize("fmt, args, name", FORMATS, ids=[f[0] for f in FORMATS])
def test_disk_full_mid_write_is_a_clean_error(fmt, args, name, llama, tmp_path, monkeypatch):
    from qtool.formats import FORMATS as REGISTRY

    cls = REGISTRY.get(fmt)
    calls = {"n": 0}
    real_add = cls.add_tensor

    def add_tensor(self, tname, t):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(self, tname, t)

    monkeypatch.setattr(cls, "add_tensor", add_tensor)
    out = tmp_path / "out" / name
    r = CliRunner().invoke(app, ["quantize", str(llama), "-f", fmt, *args, "-o", str(out)])
    assert r.exit_code == 5, r.output
    assert "No space left on device" in r.output and str(out) in r.output.replace("\n", "")
    assert list((tmp_path / "out").iterdir()) == []  # neither the output nor a temporary


def test_destination_under_a_file_is_a_clean_error(llama, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    r = CliRunner().invoke(app, ["quantize", str(llama), "-f", "gguf", "-t", "Q8_0", "-o", str(blocker / "m.gguf")])
    assert r.exit_code == 5, r.output
    assert "not-a-folder" in r.output
    assert blocker.read_text() == "x"
