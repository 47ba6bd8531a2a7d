"""llama.cpp for tests and benchmarks, built from source once per machine and cached.

Everything comes from one file, the `llama-cpp-python` sdist on PyPI (its `vendor/llama.cpp` is the
llama.cpp source tree), and from ONE compile of ggml + libllama + common (~8 min on 2 cores), which
the binding and the programs share. Under `<cache>/llama.cpp/<KEY>/` (KEY = version + a hash of the
build flags, so other flags never reuse a stale build):

* `src/`: the unpacked sdist (`src/vendor/llama.cpp` holds `convert_hf_to_gguf.py` and `gguf-py`);
* `build/`: a persistent CMake build tree. `pip wheel src` builds the binding into it (scikit-build-core
  `build-dir`); then the same tree is reconfigured with LLAMA_BUILD_TOOLS=ON and only the targets
  llama-quantize, llama-perplexity, llama-imatrix are built: three source files and links;
* `wheel/llama_cpp_python-*.whl`: the built binding; pip installs it from there, never recompiling;
* `venv-convert/`: a separate venv for the converter with the versions llama.cpp pins (numpy 2.2,
  protobuf < 5, sentencepiece), the local torch 2.13.0 CPU and the project's transformers (see
  CONVERT_REQUIREMENTS), so the project venv is untouched.

`python tests/llama_cpp_tools.py --build` (what `make llama-cpp` runs) makes all of it; once made, it
returns in about a second. A lock file serializes concurrent builders.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
TOOL_TARGETS = ("llama-quantize", "llama-perplexity", "llama-imatrix")

# CPU only, nothing we do not use. GGML_NATIVE=OFF: ggml compiles for x86-64-v3 (SSE4.2, AVX, AVX2,
# FMA, F16C, BMI2) instead of -march=native, so a cached build also runs on another machine of this
# kind even if its CPU lacks this one's AVX-512. LLAVA_BUILD=OFF skips libmtmd (multimodal, ~50
# sources; `llama_cpp` loads it lazily, only for llava chat handlers). llama-cpp-python forces
# LLAMA_BUILD_COMMON=ON (and the tools need common anyway).
CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF",
    "-DGGML_CCACHE=OFF",
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
)
# The binding's build: the default target must not include the tools.
WHEEL_CMAKE_ARGS = CMAKE_ARGS + ("-DLLAMA_BUILD_TOOLS=OFF",)
# Then the same tree: declare the tools (not installed, so the wheel's install step is unchanged).
TOOLS_CMAKE_ARGS = ("-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_TOOLS_INSTALL=OFF")

# The converter's requirements (vendor/llama.cpp/requirements/requirements-convert_*.txt) with two
# changes: the local CPU torch instead of torch==2.11.0 from the PyTorch index (unreachable here), and
# transformers at the project venv's version instead of 4.57.6: the folders it converts are written by
# that transformers, whose tokenizer_config.json names classes 4.57.6 lacks ("TokenizersBackend").
# mistral_common is left out: only models in Mistral's native format need it.
CONVERT_REQUIREMENTS = (
    "torch==2.13.0",
    "numpy~=2.2.6",
    "sentencepiece>=0.1.98,<0.3.0",
    "protobuf>=4.21.0,<5.0.0",
    "tqdm>=4.27",
    "pyyaml>=5.1",
    "requests>=2.25",
)
CONVERT_TRANSFORMERS_FALLBACK = "4.57.6"


def convert_requirements() -> tuple[str, ...]:
    """CONVERT_REQUIREMENTS plus transformers pinned to this interpreter's version."""
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        version = CONVERT_TRANSFORMERS_FALLBACK
    return CONVERT_REQUIREMENTS + (f"transformers=={version}",)


KEY = LLAMA_CPP_PYTHON_VERSION + "-" + hashlib.sha1(
    "\n".join(WHEEL_CMAKE_ARGS + TOOLS_CMAKE_ARGS).encode()
).hexdigest()[:8]


class LlamaCppBuildError(RuntimeError):
    """A step of fetching or building llama.cpp failed; the message names the step and its log."""


@dataclass(frozen=True)
class LlamaCppTools:
    """Paths of the llama.cpp programs and of its HF -> GGUF converter."""

    quantize: Path
    perplexity: Path
    imatrix: Path
    convert_script: Path  # convert_hf_to_gguf.py
    gguf_py: Path  # that tree's gguf-py (the converter puts it on sys.path itself)
    python: Path  # the converter's interpreter (venv-convert)

    def convert_hf(self, model_dir: Path, outfile: Path, outtype: str = "bf16") -> Path:
        """Run llama.cpp's `convert_hf_to_gguf.py` on a Hugging Face folder; returns `outfile`."""
        env = {**os.environ, "PYTHONPATH": str(self.gguf_py), "HF_HUB_OFFLINE": "1"}
        cmd = [str(self.python), str(self.convert_script), str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
        _run(cmd, f"convert_hf_to_gguf.py {model_dir}", outfile.with_name(outfile.name + ".log"), env=env)
        return outfile

    def quantize_gguf(self, src: Path, dst: Path, qtype: str, *extra: str) -> Path:
        """Run `llama-quantize [extra...] src dst qtype` (e.g. qtype "Q8_0"); returns `dst`."""
        cmd = [str(self.quantize), *extra, str(src), str(dst), qtype]
        _run(cmd, f"llama-quantize {qtype}", dst.with_name(dst.name + ".log"))
        return dst


# ----------------------------------------------------------------------------------------------
# Building (idempotent; every step is skipped when its output exists)


def key_dir(cache_dir: Path) -> Path:
    """`<cache>/llama.cpp/<KEY>`: everything built from one version with one set of flags."""
    return Path(cache_dir) / "llama.cpp" / KEY


def ensure_llama_cpp(cache_dir: Path) -> LlamaCppTools:
    """The llama.cpp programs and converter, building whatever is missing (from nothing ~10 min:
    the shared compile, then the tools, then the converter venv)."""
    root = key_dir(cache_dir)
    tools = _tools_at(root)
    if _tools_ready(tools):
        return tools
    with _lock(root.parent / ".lock"):
        _ensure_wheel(Path(cache_dir), root)  # the shared compile happens here
        _ensure_tool_binaries(root)
        _ensure_convert_venv(root / "venv-convert")
    if not _tools_ready(tools):
        raise LlamaCppBuildError(f"llama.cpp tools still missing under {root} after building")
    return tools


def ensure_binding(cache_dir: Path) -> None:
    """Make `import llama_cpp` work in this interpreter's environment, at LLAMA_CPP_PYTHON_VERSION:
    build the wheel once into the cache, then pip-install it from there (a few seconds)."""
    if _installed_binding_version() == LLAMA_CPP_PYTHON_VERSION:
        return
    root = key_dir(cache_dir)
    with _lock(root.parent / ".lock"):
        wheel = _ensure_wheel(Path(cache_dir), root)
        _run([sys.executable, "-m", "pip", "install", "-q", str(wheel)], "pip install llama-cpp-python wheel", root / "install.log")


def _tools_at(root: Path) -> LlamaCppTools:
    src = root / "src" / "vendor" / "llama.cpp"
    return LlamaCppTools(
        quantize=root / "build" / "bin" / "llama-quantize",
        perplexity=root / "build" / "bin" / "llama-perplexity",
        imatrix=root / "build" / "bin" / "llama-imatrix",
        convert_script=src / "convert_hf_to_gguf.py",
        gguf_py=src / "gguf-py",
        python=root / "venv-convert" / "bin" / "python",
    )


def _tools_ready(t: LlamaCppTools) -> bool:
    marker = t.python.parents[1] / ".installed"
    files = (t.quantize, t.perplexity, t.imatrix, t.convert_script, t.gguf_py, marker)
    return all(p.exists() for p in files) and marker.read_text() == "\n".join(convert_requirements()) + "\n"


def _installed_binding_version() -> str | None:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None


def _ensure_sdist(cache_dir: Path) -> Path:
    """The sdist, downloaded once with pip (source only: `--no-binary :all:`)."""
    dest = cache_dir / "llama.cpp"
    sdist = dest / SDIST_NAME
    if not sdist.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               "-d", str(dest), f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
        _run(cmd, "pip download llama-cpp-python sdist", dest / "download.log")
    return sdist


def _ensure_source(cache_dir: Path, root: Path) -> Path:
    """The sdist unpacked to `<root>/src`, without llama.cpp's 110 MB of test vocabularies and docs.
    It stays: the build tree refers to it and the converter runs from it."""
    src = root / "src"
    if (src / "pyproject.toml").is_file():
        return src
    sdist = _ensure_sdist(cache_dir)
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/"
    skip = tuple(prefix + "vendor/llama.cpp/" + d for d in ("models/", "docs/", "media/"))
    tmp = root / "src.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith(prefix) and not m.name.startswith(skip):
                m.name = m.name[len(prefix):]
                members.append(m)
        tar.extractall(tmp, members=members, filter="tar")
    if not (tmp / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        raise LlamaCppBuildError(f"{sdist} has no vendor/llama.cpp tree")
    tmp.rename(src)
    return src


def _ensure_wheel(cache_dir: Path, root: Path) -> Path:
    """The binding's wheel: `pip wheel` on the unpacked sdist, compiling into the persistent
    `<root>/build` (the expensive step, once)."""
    wheel_dir = root / "wheel"
    found = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
    if found:
        return found[0]
    src = _ensure_source(cache_dir, root)
    tmp = root / "wheel.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    env = {**os.environ, "CMAKE_ARGS": " ".join(WHEEL_CMAKE_ARGS), "CMAKE_BUILD_PARALLEL_LEVEL": str(_jobs())}
    cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp),
           f"--config-settings=build-dir={root / 'build'}", str(src)]
    t0 = time.time()
    _run(cmd, "building the llama-cpp-python wheel (llama.cpp compile)", root / "wheel-build.log", env=env)
    tmp.rename(wheel_dir)
    print(f"[llama.cpp] binding wheel built in {time.time() - t0:.0f} s", file=sys.stderr)
    return sorted(wheel_dir.glob("llama_cpp_python-*.whl"))[0]


def _ensure_tool_binaries(root: Path) -> None:
    """Reconfigure the wheel's build tree with the tools on and build only TOOL_TARGETS."""
    build = root / "build"
    if all((build / "bin" / t).is_file() for t in TOOL_TARGETS):
        return
    if not (build / "CMakeCache.txt").is_file():
        raise LlamaCppBuildError(f"{build} has no CMake cache: delete {root / 'wheel'} and rerun to rebuild")
    log = root / "tools-build.log"
    log.unlink(missing_ok=True)
    t0 = time.time()
    _run(["cmake", "-S", str(root / "src"), "-B", str(build), *TOOLS_CMAKE_ARGS],
         "cmake configure (llama.cpp tools)", log, append=True)
    _run(["cmake", "--build", str(build), "-j", str(_jobs()), "--target", *TOOL_TARGETS],
         "cmake build (llama.cpp tools)", log, append=True)
    print(f"[llama.cpp] {', '.join(TOOL_TARGETS)} built in {time.time() - t0:.0f} s", file=sys.stderr)


def _ensure_convert_venv(venv: Path) -> None:
    """A venv with convert_requirements() for `convert_hf_to_gguf.py`; its `.installed` marker lists
    them, and a changed list (the project upgraded transformers) updates the venv in place."""
    marker = venv / ".installed"
    reqs = "\n".join(convert_requirements()) + "\n"
    if marker.is_file() and marker.read_text() == reqs:
        return
    log = venv.with_name("venv-convert.log")
    log.unlink(missing_ok=True)
    t0 = time.time()
    if not (venv / "bin" / "python").is_file():
        _run([sys.executable, "-m", "venv", str(venv)], "python -m venv (converter)", log, append=True)
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *convert_requirements()],
         "pip install (converter venv)", log, append=True)
    marker.write_text(reqs)
    print(f"[llama.cpp] converter venv made in {time.time() - t0:.0f} s", file=sys.stderr)


def _jobs() -> int:
    return max(1, len(os.sched_getaffinity(0)))


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`: a second builder waits, then finds the work done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: Sequence[str], what: str, log: Path, env: dict | None = None, append: bool = False) -> None:
    """Run `cmd` with its output going to `log`; on failure raise with the step, log path and tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a" if append else "w") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            rc = subprocess.run(list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
        except FileNotFoundError as e:
            raise LlamaCppBuildError(f"{what}: {e} (cmake, ninja or make, and a C++ compiler are needed)") from e
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise LlamaCppBuildError(f"{what} failed (exit {rc}); full log: {log}\n--- last lines ---\n{tail}")


# ----------------------------------------------------------------------------------------------
# Running GGUF files through the binding


def _llama(path: Path, **kw):
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise ImportError("llama_cpp is not installed in this venv: run `make llama-cpp`") from e
    return Llama(model_path=str(path), n_threads=2, verbose=False, **kw)


def gguf_next_token_logits(path: Path, token_ids: list[int]):
    """llama.cpp's logits at every position for `token_ids` (fed as given, no BOS added):
    float32 numpy array [len(token_ids), vocab]; row i scores the token after token_ids[:i+1]."""
    import numpy as np

    n = len(token_ids)
    n_ctx = max(64, -(-n // 64) * 64)
    llm = _llama(path, logits_all=True, n_ctx=n_ctx, n_batch=min(n_ctx, 512))
    try:
        llm.eval(list(token_ids))
        return np.array(llm.scores[:n], dtype=np.float32, copy=True)
    finally:
        llm.close()


def llama_tokenize(path: Path, text: str, add_bos: bool) -> list[int]:
    """Token ids of `text` by the GGUF's own tokenizer in llama.cpp (special tokens as plain text)."""
    llm = _llama(path, vocab_only=True)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
    finally:
        llm.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build", action="store_true", help="install the binding and build the tools")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("QTOOL_CACHE", Path(__file__).resolve().parents[1] / ".cache")))
    args = p.parse_args(argv)
    if not args.build:
        p.print_help()
        return 2
    try:
        ensure_binding(args.cache)
        tools = ensure_llama_cpp(args.cache)
    except LlamaCppBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, path in vars(tools).items():
        print(f"{name:15s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
