"""Start-up cost and thread defaults: `qtool --help` and `qtool inspect` must not import torch,
transformers or datasets; the command list must still be the real one; qtool sets
OMP_WAIT_POLICY=PASSIVE before torch loads unless the user chose a policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qtool.cli.main  # noqa: F401  (registers the lazy commands)
from qtool.cli.lazy import LazyGroup, docstring_of, load_command, set_thread_defaults
from tiny_models import build_tiny

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "datasets", "gguf", "numpy", "safetensors", "huggingface_hub", "tokenizers")

# runs the CLI entry point the console script runs, then reports what got imported and the CPU it took
RUN_MAIN = """
import json, os, sys, time
t0 = time.process_time()
sys.argv = ["qtool"] + sys.argv[1:]
from qtool.cli.main import main
try:
    main()
except SystemExit as e:
    code = e.code
else:
    code = 0
print("\\n@@" + json.dumps({"code": code, "cpu": time.process_time() - t0,
    "imported": sorted({m.split(".")[0] for m in sys.modules} & set(%r)),
    "omp": os.environ.get("OMP_WAIT_POLICY")}))
""" % (HEAVY,)


def run_main(*args: str, env: dict | None = None) -> dict:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    for k, v in list(full_env.items()):
        if v is None:
            del full_env[k]
    r = subprocess.run([sys.executable, "-c", RUN_MAIN, *args], capture_output=True, text=True, env=full_env,
                       timeout=300)
    assert "@@" in r.stdout, r.stderr[-2000:]
    out, _, tail = r.stdout.rpartition("@@")
    return {**json.loads(tail), "stdout": out, "stderr": r.stderr}


def test_help_imports_nothing_heavy_and_lists_every_command():
    got = run_main("--help")
    assert got["code"] == 0, got["stderr"]
    assert got["imported"] == [], f"`qtool --help` imported {got['imported']}"
    for name in LazyGroup.lazy_commands:
        assert name in got["stdout"]
    # measured ~0.25 s of CPU on an idle core (the bound: 0.5 s); this allows a loaded CI box
    assert got["cpu"] < 1.5, got["cpu"]


def test_inspect_imports_nothing_heavy(tmp_path):
    folder = build_tiny("llama", tmp_path / "tiny")
    got = run_main("inspect", str(folder), "--json")
    assert got["code"] == 0, got["stderr"]
    assert json.loads(got["stdout"])["totals"]["params"] > 0
    assert got["imported"] == [], f"`qtool inspect` imported {got['imported']}"


@pytest.mark.parametrize("name", sorted(LazyGroup.lazy_commands))
def test_the_listed_help_is_the_real_commands_help(name):
    """The root help's stand-in (docstring read with ast) says what the real command says."""
    module, function = LazyGroup.lazy_commands[name]
    real = load_command(name, module, function)
    assert real.name == name and real.callback is not None
    assert docstring_of(module, function) == real.help


def test_a_command_runs_after_lazy_loading():
    got = run_main("formats", "--json")  # an eager command beside the lazy ones
    assert got["code"] == 0 and "gguf" in json.loads(got["stdout"])["formats"]
    got = run_main("quantize", "--help")
    assert got["code"] == 0 and "--bits" in got["stdout"]


def test_thread_defaults_respect_the_users_choice():
    env: dict[str, str] = {}
    assert set_thread_defaults(env) == {"OMP_WAIT_POLICY": "PASSIVE"} and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert set_thread_defaults(env) == {} and env["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_entry_point_sets_passive_waiting_before_torch_loads():
    # `formats` imports the registries, hence torch: the policy must already be in the environment
    got = run_main("formats", env={"OMP_WAIT_POLICY": None})
    assert got["code"] == 0 and "torch" in got["imported"] and got["omp"] == "PASSIVE"
    assert run_main("formats", env={"OMP_WAIT_POLICY": "ACTIVE"})["omp"] == "ACTIVE"
