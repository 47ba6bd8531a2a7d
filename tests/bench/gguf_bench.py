"""GGUF section of the qtool bench: qtool's GGUF writer against llama.cpp, on one machine in one run.

    python tests/bench/run_bench.py --gguf-only      (this section alone, merged into results.json)

Rows (llama.cpp = the build cached by tests/llama_cpp_tools.py):

  A. End to end, the bf16 SmolLM2-135M-Instruct folder -> Q4_K_M GGUF: `qtool quantize DIR -f gguf
     -t Q4_K_M` against llama.cpp's two steps, `convert_hf_to_gguf.py DIR --outtype bf16` (its own
     venv, PYTHONPATH=gguf-py) then `llama-quantize BF16.gguf OUT.gguf Q4_K_M`. Every command runs
     alone under measure.py (wall time; peak RSS = the kernel's ru_maxrss of that process). The two
     Q4_K_M files are read with gguf.GGUFReader and compared tensor by tensor (type, shape, bytes);
     metadata and tokenizer are not compared.
  B. Peak RSS of a random ~1.1 B Llama -> Q4_K_M: qtool (budget 1.5 GiB) and llama.cpp's two steps,
     on the same folder. llama.cpp's converter needs `architectures` in config.json and a tokenizer,
     which the bench's random Llama (random_llama.py, vocab 32000, no tokenizer) lacks, so both tools
     read `$QTOOL_CACHE/bench/random-llama-1b-tok`: the same random Llama with SmolLM2's vocabulary
     size (49152), its tokenizer files and `architectures` (built once, cached). qtool also runs on
     the plain random-llama-1b (the bench's 1.1 B input). The two Q4_K_M files are compared too.
  C. Held-out perplexity of each mixture on SmolLM2: qtool's file beside llama-quantize's file of the
     same type (from llama.cpp's bf16 GGUF of row A), both scored by the same program,
     `llama-perplexity -m FILE -f TEXT -c 512 --chunks N -t 2`, TEXT = the second half of
     WikiText-2 validation as cut by qtool.evaluate.split_text. Baseline: bf16 GGUFs (qtool's
     `export -f gguf -t BF16` and llama.cpp's converter output). Size on disk; bpw = 8 x (bytes of
     all tensor data) / (elements of all tensors), the figure llama-quantize prints.

A step that cannot run leaves its error in the row; the table prints it instead of numbers.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmt  # noqa: E402
from measure import Measured, run_measured  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

GIB = 1 << 30
MIB = 1 << 20
RSS_BUDGET_BYTES = int(1.5 * GIB)
PPL_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q2_K", "Q4_0")
# x 512 tokens (run_bench --gguf-chunks). 8: on a quiet 2-core machine one llama-perplexity run of
# SmolLM2 takes ~1 s a chunk, 18 runs ~2.5 min, and the whole section ~8 min; under load (other
# jobs on the 2 cores) everything here takes 3-6x longer.
DEFAULT_CHUNKS = 8
CTX = 512
THREADS = 2
TOK_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
TOK_PRESET = "1b-vocab49152"
TOK_MARK = ".tokenizer-complete"
_PPL_RE = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


# -- helpers ---------------------------------------------------------------------------------------
def _err(e: BaseException) -> str:
    """One short line for the table (the last non-empty line of the message)."""
    lines = [l for l in str(e).splitlines() if l.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]


def _measure(cmd: list, env: dict, what: str) -> dict:
    m: Measured = run_measured([str(c) for c in cmd], env=env, cwd=REPO)
    out = {
        "command": m.cmd,
        "wall_s": round(m.wall_s, 2),
        "peak_rss_bytes": m.peak_rss_bytes,
        "sampled_peak_rss_anon_bytes": m.sampled_peaks_bytes.get("RssAnon"),
        "sampled_peak_rss_file_bytes": m.sampled_peaks_bytes.get("RssFile"),
    }
    if m.returncode != 0:
        raise RuntimeError(f"{what} exited {m.returncode}:\n{(m.stderr or m.stdout)[-3000:]}")
    return out


_READERS: dict = {}


def reader(path: Path):
    """gguf.GGUFReader of `path`, opened once (parsing the 49k-token vocabulary costs ~2 s)."""
    import gguf

    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _READERS:
        _READERS[key] = gguf.GGUFReader(path)
    return _READERS[key]


def forget_readers() -> None:
    _READERS.clear()


def gguf_stats(path: Path) -> dict:
    """File size, tensor count and bpw (tensor data bits / tensor elements) of a GGUF file."""
    r = reader(path)
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    nel = sum(int(t.n_elements) for t in r.tensors)
    return {"size_bytes": path.stat().st_size, "tensors": len(r.tensors), "tensor_bytes": nbytes,
            "params": nel, "bpw": round(8 * nbytes / nel, 4)}


def compare_tensors(a: Path, b: Path) -> dict:
    """Tensor-by-tensor comparison of two GGUF files: names, types, shapes and data bytes."""
    import numpy as np

    ra, rb = reader(a), reader(b)
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    common = [n for n in ta if n in tb]
    type_diff, shape_diff, byte_diff = [], [], []
    for n in common:
        x, y = ta[n], tb[n]
        if x.tensor_type != y.tensor_type:
            type_diff.append(f"{n}: {x.tensor_type.name} vs {y.tensor_type.name}")
            continue
        if list(x.shape) != list(y.shape):
            shape_diff.append(n)
            continue
        if not np.array_equal(np.asarray(x.data).reshape(-1).view(np.uint8), np.asarray(y.data).reshape(-1).view(np.uint8)):
            byte_diff.append(f"{n} ({x.tensor_type.name})")
    only_a, only_b = sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta))
    same_types = not (type_diff or only_a or only_b)
    return {
        "tensors": len(common),
        "only_qtool": only_a[:10], "only_llama_cpp": only_b[:10],
        "type_mismatches": len(type_diff), "type_mismatch_examples": type_diff[:5],
        "shape_mismatches": len(shape_diff),
        "byte_mismatches": len(byte_diff), "byte_mismatch_examples": byte_diff[:5],
        "identical_types": same_types,
        "identical_bytes": same_types and not shape_diff and not byte_diff,
    }


def _tokenizer_fields(path: Path) -> dict:
    """The tokenizer.ggml.* fields of a GGUF file, as comparable Python values."""
    out = {}
    for name, f in reader(path).fields.items():
        if name.startswith("tokenizer.ggml."):
            try:
                out[name] = f.contents()
            except Exception:  # noqa: BLE001 - a field this gguf version cannot decode
                out[name] = [bytes(f.parts[i]).hex() for i in f.data]
    return out


def tokenizer_diff(a: Path, b: Path) -> list[str]:
    """Names of tokenizer.ggml.* fields that differ between two GGUF files (both ways)."""
    fa, fb = _tokenizer_fields(a), _tokenizer_fields(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def perplexity(tools, model: Path, text: Path, chunks: int) -> dict:
    """`llama-perplexity -m model -f text -c 512 --chunks N -t 2`; its final estimate."""
    cmd = [str(tools.perplexity), "-m", str(model), "-f", str(text), "-c", str(CTX), "--chunks", str(chunks), "-t", str(THREADS)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    log = done.stdout + done.stderr
    m = _PPL_RE.search(log)
    if done.returncode != 0 or not m:
        raise RuntimeError(f"llama-perplexity {model.name} exited {done.returncode}: {log[-1500:]}")
    n = re.search(r"calculating perplexity over (\d+) chunks", log)
    return {"ppl": float(m.group(1)), "ppl_err": float(m.group(2)), "chunks": int(n.group(1)) if n else chunks,
            "seconds": round(secs, 1)}


# -- commands --------------------------------------------------------------------------------------
def _convert_env(tools) -> dict:
    return {**os.environ, "PYTHONPATH": str(tools.gguf_py), "HF_HUB_OFFLINE": "1"}


def qtool_quantize(qtool: str, env: dict, src: Path, out: Path, qtype: str) -> dict:
    cmd = [qtool, "quantize", src, "-f", "gguf", "-t", qtype, "-o", out, "--overwrite", "--json"]
    return _measure(cmd, env, f"qtool quantize -t {qtype}")


def qtool_export_bf16(qtool: str, env: dict, src: Path, out: Path) -> dict:
    cmd = [qtool, "export", src, "-f", "gguf", "-t", "BF16", "-o", out, "--overwrite", "--json"]
    return _measure(cmd, env, "qtool export -t BF16")


def llama_convert(tools, src: Path, out: Path) -> dict:
    cmd = [tools.python, tools.convert_script, src, "--outtype", "bf16", "--outfile", out]
    return _measure(cmd, _convert_env(tools), "convert_hf_to_gguf.py")


def llama_quantize(tools, src: Path, out: Path, qtype: str, imatrix: Path | None = None) -> dict:
    cmd = [tools.quantize, *(["--imatrix", imatrix] if imatrix else []), src, out, qtype, str(THREADS)]
    return _measure(cmd, dict(os.environ), f"llama-quantize {qtype}" + (" --imatrix" if imatrix else ""))


def _pair_total(steps: dict) -> dict:
    return {"wall_s": round(sum(s["wall_s"] for s in steps.values()), 2),
            "peak_rss_bytes": max(s["peak_rss_bytes"] for s in steps.values())}


# -- row A: end to end -----------------------------------------------------------------------------
def end_to_end(tools, qtool: str, env: dict, model: Path, work: Path) -> dict:
    row: dict = {"row": "SmolLM2-135M-Instruct bf16 folder -> Q4_K_M", "qtype": "Q4_K_M"}
    q_out, l_bf16, l_out = work / "smollm2.qtool.Q4_K_M.gguf", work / "smollm2.llama.bf16.gguf", work / "smollm2.llama.Q4_K_M.gguf"
    try:
        row["qtool"] = {**qtool_quantize(qtool, env, model, q_out, "Q4_K_M"), **gguf_stats(q_out)}
    except Exception as e:  # noqa: BLE001
        row["qtool"] = {"error": _err(e)}
    try:
        steps = {"convert_hf_to_gguf (bf16)": llama_convert(tools, model, l_bf16)}
        steps["llama-quantize Q4_K_M"] = {**llama_quantize(tools, l_bf16, l_out, "Q4_K_M"), **gguf_stats(l_out)}
        row["llama_cpp"] = {"steps": steps, **_pair_total(steps)}
    except Exception as e:  # noqa: BLE001
        row["llama_cpp"] = {"error": _err(e)}
    q, l = row["qtool"], row["llama_cpp"]
    if "error" not in q and "error" not in l:
        row["ratio_wall"] = round(q["wall_s"] / l["wall_s"], 3)
        row["ratio_peak_rss"] = round(q["peak_rss_bytes"] / l["peak_rss_bytes"], 3)
        try:
            row["compare"] = compare_tensors(q_out, l_out)
        except Exception as e:  # noqa: BLE001
            row["compare"] = {"error": _err(e)}
    forget_readers()
    return row


# -- row B: 1.1 B peak RSS -------------------------------------------------------------------------
def random_llama_with_tokenizer(bench: Path, model: Path) -> tuple[Path, str]:
    """The bench's random 1.1 B Llama in a form llama.cpp's converter accepts: `architectures` in
    config.json and SmolLM2's tokenizer files. Reuses random-llama-1b's shards (symlinks) when its
    vocabulary size equals SmolLM2's; otherwise builds the same model with SmolLM2's vocabulary size
    (seeded, cached). Returns (folder, how it was made)."""
    import random_llama

    out = bench / "random-llama-1b-tok"
    smol_vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    base_cfg = random_llama.PRESETS["1b"]
    if base_cfg["vocab_size"] == smol_vocab:
        how = f"random-llama-1b's shards (vocab {smol_vocab} = SmolLM2's) + SmolLM2's tokenizer files + architectures"
    else:
        how = (f"random-llama-1b rebuilt with SmolLM2's vocab size {smol_vocab} (its own is {base_cfg['vocab_size']}) "
               "+ SmolLM2's tokenizer files + architectures in config.json")
    if (out / TOK_MARK).is_file():
        return out, how
    if base_cfg["vocab_size"] == smol_vocab:
        base = random_llama.build(bench / "random-llama-1b", "1b")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for f in base.iterdir():
            if f.suffix == ".safetensors" or f.name in ("model.safetensors.index.json", "config.json"):
                if f.name == "config.json":
                    shutil.copy2(f, out / f.name)
                else:
                    (out / f.name).symlink_to(f.resolve())
    else:
        random_llama.PRESETS.setdefault(TOK_PRESET, {**base_cfg, "vocab_size": smol_vocab})
        random_llama.build(out, TOK_PRESET)
    add_tokenizer(out, model)
    return out, how


def add_tokenizer(out: Path, model: Path) -> None:
    """Make a random Llama folder one llama.cpp's converter takes: `architectures` in config.json and
    `model`'s (SmolLM2's) tokenizer files; then the mark that says the folder is complete."""
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in TOK_FILES:
        if (model / name).is_file():
            shutil.copy2(model / name, out / name)
    (out / TOK_MARK).write_text("")


def big_rss(tools, qtool: str, env: dict, model: Path, work: Path) -> dict:
    import random_llama

    row: dict = {"row": "random Llama ~1.1B (bf16) -> Q4_K_M", "qtype": "Q4_K_M", "rss_budget_bytes": RSS_BUDGET_BYTES}
    # qtool on the bench's own random Llama (vocab 32000, no tokenizer: qtool writes tokenizer model "none")
    plain_out = work / "big-plain.qtool.Q4_K_M.gguf"
    try:
        plain = random_llama.build(work.parent / "random-llama-1b", "1b")
        row["qtool_plain"] = {"input": str(plain), **qtool_quantize(qtool, env, plain, plain_out, "Q4_K_M"), **gguf_stats(plain_out)}
        row["qtool_plain"]["rss_pass"] = row["qtool_plain"]["peak_rss_bytes"] < RSS_BUDGET_BYTES
    except Exception as e:  # noqa: BLE001
        row["qtool_plain"] = {"error": _err(e)}
    forget_readers()
    plain_out.unlink(missing_ok=True)
    try:
        t0 = time.perf_counter()
        src, how = random_llama_with_tokenizer(work.parent, model)
        row.update(input=str(src), input_how=how, input_prepare_s=round(time.perf_counter() - t0, 1))
    except Exception as e:  # noqa: BLE001
        row["error"] = _err(e)
        return row
    q_out, l_bf16, l_out = work / "big.qtool.Q4_K_M.gguf", work / "big.llama.bf16.gguf", work / "big.llama.Q4_K_M.gguf"
    try:
        row["qtool"] = {**qtool_quantize(qtool, env, src, q_out, "Q4_K_M"), **gguf_stats(q_out)}
        row["qtool"]["rss_pass"] = row["qtool"]["peak_rss_bytes"] < RSS_BUDGET_BYTES
        row["params_total"] = row["qtool"]["params"]
    except Exception as e:  # noqa: BLE001
        row["qtool"] = {"error": _err(e)}
    try:
        steps = {"convert_hf_to_gguf (bf16)": llama_convert(tools, src, l_bf16)}
        l_bf16_size = l_bf16.stat().st_size
        steps["convert_hf_to_gguf (bf16)"]["size_bytes"] = l_bf16_size
        steps["llama-quantize Q4_K_M"] = {**llama_quantize(tools, l_bf16, l_out, "Q4_K_M"), **gguf_stats(l_out)}
        row["llama_cpp"] = {"steps": steps, **_pair_total(steps)}
    except Exception as e:  # noqa: BLE001
        row["llama_cpp"] = {"error": _err(e)}
    if "error" not in row["qtool"] and "error" not in row["llama_cpp"]:
        try:
            row["compare"] = compare_tensors(q_out, l_out)
        except Exception as e:  # noqa: BLE001
            row["compare"] = {"error": _err(e)}
    forget_readers()
    for p in (q_out, l_bf16, l_out):  # 3 GB that nothing reuses
        p.unlink(missing_ok=True)
    row["rss_pass"] = all(row.get(k, {}).get("rss_pass", False) for k in ("qtool_plain", "qtool"))
    return row


# -- row C: perplexity per mixture -----------------------------------------------------------------
def perplexity_rows(tools, qtool: str, env: dict, model: Path, text_src: Path, work: Path, chunks: int, e2e: dict) -> list[dict]:
    from qtool.evaluate import text_part

    rows: list[dict] = []
    l_bf16 = work / "smollm2.llama.bf16.gguf"
    with tempfile.TemporaryDirectory(prefix="qtool-gguf-bench-") as d:
        text = Path(d) / "wikitext2-valid.eval.txt"
        text.write_text(text_part(text_src, "eval"), encoding="utf-8")
        for qtype in ("BF16", *PPL_TYPES):
            row: dict = {"qtype": qtype}
            q_out, l_out = work / f"smollm2.qtool.{qtype}.gguf", work / f"smollm2.llama.{qtype}.gguf"
            if qtype == "BF16":
                l_out = l_bf16
            # qtool's file (row A's Q4_K_M is reused)
            try:
                if qtype == "Q4_K_M" and "error" not in e2e.get("qtool", {"error": 1}):
                    row["qtool_wall_s"] = e2e["qtool"]["wall_s"]
                else:
                    made = qtool_export_bf16(qtool, env, model, q_out) if qtype == "BF16" else qtool_quantize(qtool, env, model, q_out, qtype)
                    row["qtool_wall_s"] = made["wall_s"]
                row["qtool"] = {**gguf_stats(q_out), **perplexity(tools, q_out, text, chunks)}
            except Exception as e:  # noqa: BLE001
                row["qtool"] = {"error": _err(e)}
            # llama.cpp's file, quantized from its own bf16 GGUF (row A's Q4_K_M is reused)
            try:
                if not l_bf16.is_file():
                    llama_convert(tools, model, l_bf16)
                if qtype not in ("BF16", "Q4_K_M") or not l_out.is_file():
                    row["llama_quantize_wall_s"] = llama_quantize(tools, l_bf16, l_out, qtype)["wall_s"]
                row["llama_cpp"] = {**gguf_stats(l_out), **perplexity(tools, l_out, text, chunks)}
            except Exception as e:  # noqa: BLE001
                row["llama_cpp"] = {"error": _err(e)}
            if q_out.is_file() and l_out.is_file():
                try:
                    row["compare"] = compare_tensors(q_out, l_out)
                    if qtype == "BF16":
                        row["tokenizer_fields_differing"] = tokenizer_diff(q_out, l_out)
                except Exception as e:  # noqa: BLE001
                    row["compare"] = {"error": _err(e)}
            forget_readers()
            rows.append(row)
            print(f"[gguf bench] {qtype}: qtool {row['qtool'].get('ppl', row['qtool'].get('error'))}, "
                  f"llama.cpp {row['llama_cpp'].get('ppl', row['llama_cpp'].get('error'))}", file=sys.stderr, flush=True)
    return rows


# -- the section -----------------------------------------------------------------------------------
def run_gguf_section(model: Path, text: Path, work: Path, qtool: str, env: dict, chunks: int = DEFAULT_CHUNKS,
                     skip_1b: bool = False) -> dict:
    """Rows A, B, C (see the module doc); never raises: a failing part leaves its error."""
    t0 = time.perf_counter()
    work = work / "gguf"
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob("*.gguf"):  # every file compared or scored below is made in this run
        stale.unlink()
    sec: dict = {"config": {"model": str(model), "text": str(text), "part": "eval (second half, qtool.evaluate.split_text)",
                            "ctx": CTX, "chunks": chunks, "threads": THREADS, "types": list(PPL_TYPES)},
                 "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "load_average_at_start": os.getloadavg(), "qtool_code_at_start": qtool_state()}
    try:
        from llama_cpp_tools import ensure_llama_cpp

        import gguf

        tools = ensure_llama_cpp(Path(os.environ.get("QTOOL_CACHE", REPO / ".cache")))
        sec["llama_cpp"] = {k: str(v) for k, v in vars(tools).items()}
        sec["gguf_py_reader_version"] = getattr(gguf, "__version__", None) or _pkg_version("gguf")
    except Exception as e:  # noqa: BLE001
        sec["error"] = f"llama.cpp unavailable: {_err(e)}"
        sec["seconds"] = round(time.perf_counter() - t0, 1)
        return sec

    def stage(name: str, fn):
        t = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a bug in this file must not lose the other rows
            traceback.print_exc()
            return {"error": _err(e)}
        finally:
            sec.setdefault("stage_seconds", {})[name] = round(time.perf_counter() - t, 1)

    sec["end_to_end"] = stage("end_to_end", lambda: end_to_end(tools, qtool, env, model, work))
    ppl = stage("perplexity", lambda: perplexity_rows(tools, qtool, env, model, text, work, chunks, sec["end_to_end"]))
    sec["perplexity"] = ppl if isinstance(ppl, list) else [ppl]
    if skip_1b:
        sec["big_rss"] = {"row": "random Llama ~1.1B (bf16) -> Q4_K_M", "error": "--skip-1b"}
    else:
        sec["big_rss"] = stage("big_rss", lambda: big_rss(tools, qtool, env, model, work))
    sec["seconds"] = round(time.perf_counter() - t0, 1)
    sec["qtool_code_at_end"] = qtool_state()
    sec["qtool_code_changed_during_run"] = sec["qtool_code_at_end"] != sec["qtool_code_at_start"]
    return sec


def qtool_state() -> dict:
    """HEAD and a hash of the uncommitted changes under qtool/: the code every qtool command here ran."""
    import hashlib

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout

    try:
        return {"commit": git("rev-parse", "HEAD").strip(), "qtool_diff_sha1": hashlib.sha1(git("diff", "HEAD", "--", "qtool").encode()).hexdigest()[:12]}
    except OSError:
        return {}


def _pkg_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- markdown --------------------------------------------------------------------------------------
def _same(c: dict | None) -> str:
    if not c:
        return "–"
    if "error" in c:
        return f"compare failed: {c['error']}"
    if c["identical_bytes"]:
        return f"identical ({c['tensors']}/{c['tensors']} tensors: types and bytes)"
    parts = []
    if c["only_qtool"] or c["only_llama_cpp"]:
        parts.append(f"tensor names differ (only qtool: {c['only_qtool'][:3]}, only llama.cpp: {c['only_llama_cpp'][:3]})")
    if c["type_mismatches"]:
        parts.append(f"{c['type_mismatches']} type mismatches, e.g. {c['type_mismatch_examples'][:2]}")
    if c["shape_mismatches"]:
        parts.append(f"{c['shape_mismatches']} shape mismatches")
    if c["byte_mismatches"]:
        parts.append(f"types identical, {c['byte_mismatches']}/{c['tensors']} tensors differ in bytes, e.g. {c['byte_mismatch_examples'][:2]}")
    return "; ".join(parts)


def _step_rows(label: str, d: dict, extra_cols: int = 0) -> list[str]:
    pad = " – |" * extra_cols
    if "error" in d:
        return [f"| {label} | not run: {d['error']} | | |{pad}"]
    return [f"| {label} | {fmt.seconds(d['wall_s'])} | {fmt.size(d['peak_rss_bytes'])} | {fmt.size(d.get('size_bytes'))} |{pad}"]


def markdown(sec: dict) -> str:
    cfg = sec.get("config", {})
    lines = ["## GGUF vs llama.cpp", ""]
    if "error" in sec:
        return "\n".join(lines + [f"Not run: {sec['error']}", ""])
    la = sec.get("load_average_at_start", [0])[0]
    code = sec.get("qtool_code_at_start", {})
    if code:
        lines += [f"qtool at {code.get('commit', '')[:8]} (uncommitted qtool/ diff {code.get('qtool_diff_sha1')})."
                  + (" **qtool's code changed while this section ran: its rows may mix two versions.**"
                     if sec.get("qtool_code_changed_during_run") else ""), ""]
    lines += [f"{sec.get('date_utc', '')}: one run, {sec.get('seconds', 0):.0f} s for the whole section (load average at its start {la:.2f}). "
              "Wall time and peak RSS are each command's own, measured alone (kernel ru_maxrss); "
              "llama.cpp's pipeline time is the sum of its two steps, its peak RSS the larger of the two.", ""]

    # A
    a = sec.get("end_to_end", {})
    lines += ["**A. SmolLM2-135M-Instruct bf16 HF folder -> Q4_K_M GGUF, end to end**", "",
              "| tool / step | wall | peak RSS | output size |", "|---|---:|---:|---:|"]
    if "error" in a and "qtool" not in a:
        lines.append(f"| – | not run: {a['error']} | | |")
    else:
        lines += _step_rows("qtool `quantize -f gguf -t Q4_K_M`", a.get("qtool", {}))
        l = a.get("llama_cpp", {})
        if "error" in l:
            lines += _step_rows("llama.cpp", l)
        else:
            for name, st in l["steps"].items():
                lines += _step_rows(f"llama.cpp {name}", st)
            lines.append(f"| llama.cpp total (sum of wall, max of RSS) | {fmt.seconds(l['wall_s'])} | {fmt.size(l['peak_rss_bytes'])} | |")
        if "ratio_wall" in a:
            lines.append(f"| **qtool / llama.cpp** | **{a['ratio_wall']:.2f}×** | **{a['ratio_peak_rss']:.2f}×** | |")
        lines += ["", f"Q4_K_M files, qtool vs llama.cpp: {_same(a.get('compare'))}.", ""]

    # B
    b = sec.get("big_rss", {})
    lines += ["**B. random Llama ~1.1B (bf16) -> Q4_K_M GGUF, peak RSS**", "",
              "| tool / step | wall | peak RSS | output size | peak RSS < 1.5 GiB |", "|---|---:|---:|---:|---|"]
    if "error" in b:
        lines += [f"| – | not run: {b['error']} | | | |", ""]
    else:
        tok = Path(b.get("input", "")).name
        for key, label in (("qtool_plain", "qtool `quantize -f gguf -t Q4_K_M`, random-llama-1b (the bench's 1.1B: vocab 32000, no tokenizer)"),
                           ("qtool", f"qtool `quantize -f gguf -t Q4_K_M`, {tok}")):
            q = b.get(key, {})
            if "error" in q:
                lines.append(f"| {label} | not run: {q['error']} | | | **FAIL** |")
            else:
                passed = "**pass**" if q["rss_pass"] else "**FAIL**"
                lines.append(f"| {label} | {fmt.seconds(q['wall_s'])} | {fmt.size(q['peak_rss_bytes'])} | {fmt.size(q['size_bytes'])} | {passed} |")
        l = b.get("llama_cpp", {})
        if "error" in l:
            lines += _step_rows("llama.cpp", l, 1)
        else:
            for name, st in l["steps"].items():
                lines += _step_rows(f"llama.cpp {name}, {tok}", st, 1)
            lines.append(f"| llama.cpp total (sum of wall, max of RSS) | {fmt.seconds(l['wall_s'])} | {fmt.size(l['peak_rss_bytes'])} | | – |")
        lines += ["", f"`{tok}`: {b.get('input_how', '')} ({b.get('params_total') or 0:,} parameters), the same input for both tools "
                  "(llama.cpp's converter refuses random-llama-1b: no `architectures` in config.json, no tokenizer). "
                  f"Q4_K_M files of {tok}, qtool vs llama.cpp: {_same(b.get('compare'))}.", ""]

    # C
    rows = sec.get("perplexity", [])
    n = cfg.get("chunks")
    lines += [f"**C. Held-out perplexity, SmolLM2-135M-Instruct, llama-perplexity -c {cfg.get('ctx')} --chunks {n} -t {cfg.get('threads')}** "
              f"({n} × {cfg.get('ctx')} tokens of the second half of WikiText-2 validation; both files scored by the same program)", "",
              f"| type | qtool size | qtool bpw | qtool PPL (N={n}) | llama.cpp size | llama.cpp bpw | llama.cpp PPL (N={n}) | PPL qtool / llama.cpp | tensors qtool vs llama.cpp |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "qtype" not in r:
            lines.append(f"| – | not run: {r.get('error')} | | | | | | | |")
            continue
        cells = []
        for side in ("qtool", "llama_cpp"):
            d = r.get(side, {})
            if "error" in d:
                cells += [f"not run: {d['error']}", "", ""]
            else:
                cells += [fmt.size(d["size_bytes"]), f"{d['bpw']:.3f}", f"{d['ppl']:.3f} ± {d['ppl_err']:.3f}"]
        q, l = r.get("qtool", {}), r.get("llama_cpp", {})
        ratio = f"{q['ppl'] / l['ppl']:.4f}" if "ppl" in q and "ppl" in l else "–"
        label = "BF16 (baseline)" if r["qtype"] == "BF16" else r["qtype"]
        lines.append(f"| {label} | {' | '.join(cells)} | {ratio} | {_same(r.get('compare'))} |")
    notes = []
    bf = next((r for r in rows if r.get("qtype") == "BF16"), None)
    if bf and "tokenizer_fields_differing" in bf:
        diff = bf["tokenizer_fields_differing"]
        notes.append("tokenizer.ggml.* fields, qtool's BF16 vs llama.cpp's: "
                     + ("all identical, so both files tokenize the text alike." if not diff else f"differ in {', '.join(diff)}."))
    notes.append("bpw = 8 × tensor data bytes / tensor elements over all tensors (norms and embeddings included), as llama-quantize prints it. "
                 "qtool's file and llama.cpp's of the same type are compared tensor by tensor (name, type, shape, bytes) with gguf.GGUFReader; "
                 "metadata is not compared.")
    lines += [""] + [f"- {x}" for x in notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # a quick look at a saved section: python gguf_bench.py results.json
    print(markdown(json.loads(Path(sys.argv[1]).read_text())["gguf"]))
