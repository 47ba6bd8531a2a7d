"""Nothing in the repository root may shadow an installed package when Python runs from the root.

`python -c ...` (and `python -m pytest`) puts the current directory first on sys.path, so a
top-level folder named like a real package wins over site-packages. A top-level `kernels/` used
to do exactly that to Hugging Face's `kernels` package, which transformers probes on every
`from_pretrained` (ImportError: cannot import name 'CUDAProperties' from 'kernels')."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tiny_models import build_tiny

ROOT = Path(__file__).resolve().parents[1]
# the only importable names the root may hold: our package, and calib_data/ (installed as
# qtool_calib_data; no published package uses the name). A new one must be checked the same way.
# setup.py (the optional C extension's build) is the usual setuptools entry point; nothing imports `setup`.
ALLOWED_TOP_LEVEL = {"qtool", "calib_data", "setup"}


def _run_from_root(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what the root itself adds
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_import_kernels_from_the_root_does_not_resolve_into_the_repository():
    r = _run_from_root("import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else '')")
    assert r.returncode == 0, r.stderr
    origin = r.stdout.strip()
    inside = origin.startswith(str(ROOT) + os.sep) and "site-packages" not in Path(origin).parts  # a venv in the checkout is fine
    assert not inside, f"`import kernels` from the root resolves to {origin}"


def test_the_root_holds_no_importable_name_but_known_ones():
    names = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.is_dir() and (p / "__init__.py").is_file()) or (p.is_file() and p.suffix == ".py")}
    assert names <= ALLOWED_TOP_LEVEL, f"the repository root would shadow packages named {sorted(names - ALLOWED_TOP_LEVEL)}"


def test_transformers_from_pretrained_works_from_the_root(tmp_path):
    """The reported failure, reproduced as the user ran it: from_pretrained, cwd = repository root."""
    folder = build_tiny("llama", tmp_path / "tiny")
    r = _run_from_root(
        "import sys; from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}); print(type(m).__name__)"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("LlamaForCausalLM"), r.stdout
