"""qtool benchmark: quality, time, memory and size of RTN outputs, on one machine in one run.

    python tests/bench/run_bench.py --out tests/bench/results      (what `make bench` runs)

Rows (one protocol for every row: no calibration; perplexity on the same non-overlapping
`--seq-len`-token windows of the second half of WikiText-2 validation, see qtool/evaluate.py):

  1. the bf16 SmolLM2-135M-Instruct folder made by `make model` (scored in float32);
  2. RTN int4 g64 sym -> compressed-tensors;  3. RTN int8 per-channel sym -> compressed-tensors:
     `qtool quantize` runs as a child process, measured alone (wall time, peak RSS from the
     kernel via wait4); the output is loaded by stock transformers (+ compressed-tensors),
     `from_pretrained(out, dtype=float32)`, and scored like row 1;
  4. peak RSS of quantizing a random ~1.1 B-parameter Llama (bf16, ~2.2 GB, built once under
     $QTOOL_CACHE/bench/) to RTN int4 g128 compressed-tensors, against the 1.5 GiB budget.

GGUF section (gguf_bench.py; skip with --no-gguf, run alone with --gguf-only): qtool's GGUF files
against llama.cpp's convert_hf_to_gguf.py + llama-quantize: end-to-end time and peak RSS, 1.1 B
peak RSS, and llama-perplexity of each mixture (Q8_0 ... Q2_K, Q4_0) for both tools' files.

Distributed section (dist_bench.py; optional, --dist, or run alone with dist_bench.py): 1 vs 2
processes (`--nproc 2`) on SmolLM2: wall time, peak RSS per rank, bytes all-reduced per block,
identical bytes; the 8B / 70B on 8 GPUs estimate from those figures.

Calibration section (calib_bench.py; skip with --no-calibration, run alone with calib_bench.py): time,
peak RSS and file size of `qtool calibrate` (32 x 512 tokens) on SmolLM2 and on the random 1.1 B
Llama, against the 3 GiB budget.

GPTQ section (gptq_bench.py; skip with --no-gptq, run alone with --gptq-only): qtool's RTN/GPTQ
(-f gptq) against GPTQModel on the same calibration windows: time, peak RSS, size, bpw,
perplexity, KLD and top-1 agreement vs bf16, every output scored by the same code.

Architectures section (arch_bench.py; skip with --no-arch, run alone with --arch-only): random ~1 B
qwen3_moe and gemma3_text (random_arch.py), qtool RTN -> compressed-tensors and -> GGUF Q4_K_M (time,
peak RSS against the 1.5 GiB budget) beside llama.cpp's converter + quantizer.

On-the-fly section (otf_bench.py; run alone with --otf-only, left out of the full run unless --otf):
qtool's bitsandbytes / torchao / FP8 / hqq / quanto files loaded by their consumers against those
libraries quantizing SmolLM2 themselves, in the same isolated venvs, same windows, same scoring code.

Writes results.json (everything, with machine info) and results.md (the table) to --out, and
prints the markdown.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf_bench  # noqa: E402
import arch_bench  # noqa: E402
import otf_bench  # noqa: E402
import calib_bench  # noqa: E402
import dist_bench  # noqa: E402
import gptq_bench  # noqa: E402
import awq_bench  # noqa: E402
from measure import Measured, run_measured  # noqa: E402
from random_llama import build as build_random_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GIB = 1 << 30
MIB = 1 << 20
RSS_BUDGET_BYTES = int(1.5 * GIB)
TEXT_FILE = "wikitext2-valid.txt"


# -- environment -----------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("QTOOL_CACHE", REPO / ".cache"))


def qtool_exe() -> str:
    beside = Path(sys.executable).with_name("qtool")
    return str(beside) if beside.exists() else (shutil.which("qtool") or "qtool")


def child_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_info() -> dict:
    """The CPU as /proc/cpuinfo names it, with family/model (one "AMD EPYC" name covers Zen 3, without
    AVX-512, and Zen 4, with AVX512_BF16: a peer computing in bf16, as GPTQModel does on the CPU, runs
    several times faster on the second) and the SIMD flags that decide such speeds."""
    fields: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            k, _, v = line.partition(":")
            k = k.strip()
            if k in ("model name", "cpu family", "model", "flags") and k not in fields:
                fields[k] = v.strip()
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name", ""), "cpu_family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
            "cpu_simd": [f for f in SIMD_FLAGS if f in flags], "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def machine_info() -> dict:
    import compressed_tensors
    import transformers

    import qtool

    cpu = cpu_info()
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "", None
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        **cpu,
        "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "qtool": qtool.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "load_average_at_start": os.getloadavg(),
    }


def folder_bytes(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# -- perplexity ------------------------------------------------------------------------------------
def load_windows(model_dir: Path, text: Path, seq_len: int, max_windows: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from qtool.evaluate import eval_windows

    tok = AutoTokenizer.from_pretrained(model_dir)
    return eval_windows(tok, text, "eval", seq_len, max_windows)


def score(folder: Path, windows: torch.Tensor, batch_size: int, check_against_reference: bool) -> dict:
    """Load `folder` with stock transformers in float32 and measure perplexity on `windows`."""
    from transformers import AutoModelForCausalLM

    from qtool.evaluate import perplexity

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    out = {"load_s": round(load_s, 2)}
    out.update(perplexity(model, windows, batch_size).to_dict())
    if check_against_reference:  # after a forward: compressed-tensors decompresses on the first one
        out["max_abs_diff_vs_qtool_dequant"] = weights_vs_reference(model, folder)
    del model
    gc.collect()
    return out


def weights_vs_reference(model, folder: Path) -> float:
    """Max |W_transformers - W_qtool| over every tensor: does the consumer decode what we meant?"""
    from qtool.formats.compressed_tensors import read_dequantized

    ref = read_dequantized(folder, torch.float32)
    sd = model.state_dict()
    worst = 0.0
    for name, t in ref.items():
        if name in sd and t.is_floating_point():
            worst = max(worst, (sd[name].float() - t).abs().max().item())
    missing = [n for n in ref if n not in sd and not n.endswith("lm_head.weight")]
    if missing:
        raise RuntimeError(f"{folder}: transformers model lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return worst


# -- rows ------------------------------------------------------------------------------------------
def quantize_cmd(model: Path, out: Path, *flags: str) -> list[str]:
    return [qtool_exe(), "quantize", str(model), *flags, "-f", "compressed-tensors", "-o", str(out), "--overwrite", "--json"]


def measured_quantize(cmd: list[str]) -> tuple[Measured, dict]:
    m = run_measured(cmd, env=child_env(), cwd=REPO)
    if m.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {m.returncode}:\n{m.stderr[-3000:]}")
    return m, json.loads(m.stdout)


def memory_fields(m: Measured) -> dict:
    return {
        "wall_s": round(m.wall_s, 2),
        "peak_rss_bytes": m.peak_rss_bytes,
        "sampled_vm_hwm_bytes": m.sampled_peaks_bytes.get("VmHWM"),
        "sampled_peak_rss_anon_bytes": m.sampled_peaks_bytes.get("RssAnon"),
        "sampled_peak_rss_file_bytes": m.sampled_peaks_bytes.get("RssFile"),
    }


def bf16_row(model: Path, windows: torch.Tensor, batch_size: int) -> dict:
    return {
        "row": "bf16 SmolLM2-135M-Instruct",
        "recipe": "bf16 (scored in float32)",
        "size_bytes": folder_bytes(model),
        "bpw": 16.0,
        "eval": score(model, windows, batch_size, check_against_reference=False),
    }


def rtn_row(label: str, model: Path, out: Path, flags: list[str], windows: torch.Tensor, batch_size: int) -> dict:
    m, report = measured_quantize(quantize_cmd(model, out, *flags))
    return {
        "row": label,
        "recipe": " ".join(flags),
        "command": m.cmd,
        **memory_fields(m),
        "size_bytes": folder_bytes(out),
        "bpw": report["bpw_quantized"],
        "sqnr_db_mean": report["sqnr_db_mean"],
        "qtool_seconds": report["seconds"],
        "eval": score(out, windows, batch_size, check_against_reference=True),
    }


def big_rss_row(work: Path) -> dict:
    t0 = time.perf_counter()
    src = build_random_llama(work / "random-llama-1b", "1b")
    build_s = time.perf_counter() - t0
    out = work / "random-llama-1b-rtn-int4-g128"
    flags = ["-m", "rtn", "-b", "4", "-g", "128"]
    m, report = measured_quantize(quantize_cmd(src, out, *flags))
    row = {
        "row": "random Llama 1.1B (bf16) -> RTN int4 g128",
        "recipe": " ".join(flags),
        "command": m.cmd,
        "input_bytes": report["input_bytes"],
        "params_total": report["params_total"],
        "build_s": round(build_s, 1),
        **memory_fields(m),
        "size_bytes": folder_bytes(out),
        "bpw": report["bpw_quantized"],
        "rss_budget_bytes": RSS_BUDGET_BYTES,
        "rss_pass": m.peak_rss_bytes < RSS_BUDGET_BYTES,
    }
    shutil.rmtree(out, ignore_errors=True)  # 0.7 GB that nothing reuses
    return row


def floor_row() -> dict:
    """Peak RSS of a process that only imports what `qtool quantize` imports: the floor under row 4."""
    code = "import torch, transformers, qtool.pipeline, qtool.cli.main"
    m = run_measured([sys.executable, "-c", code], env=child_env())
    return {"row": "import floor", "command": m.cmd, **memory_fields(m)}


# -- peers ---------------------------------------------------------------------------------------
QUANTO = "optimum-quanto==0.2.7"


def ensure_quanto_venv(work: Path) -> Path:
    """A virtual environment with only optimum-quanto in it, seeing the main environment's packages
    (the same torch, transformers and qtool). Returns its python."""
    venv = work / "venv-quanto"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    probe = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], check=True, capture_output=True, text=True)
    main_site = next(p for p in sys.path if p.endswith("site-packages"))
    (Path(probe.stdout.strip()) / "zz_main_venv.pth").write_text(f"import site; site.addsitedir({main_site!r})\n")
    if subprocess.run([str(py), "-c", "import optimum.quanto"], capture_output=True).returncode != 0:
        # --no-deps: its dependencies (torch, numpy, safetensors, huggingface_hub) come from the main venv
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", QUANTO], check=True, capture_output=True)
    return py


def quanto_peer(py: Path, model: Path, text: Path, weights: str, cfg: dict, work: Path) -> dict:
    result = work / f"quanto-{weights}.json"
    result.unlink(missing_ok=True)
    cmd = [str(py), str(Path(__file__).with_name("peer_quanto.py")), str(model), str(text), str(result), "--weights", weights,
           "--windows", str(cfg["windows"]), "--seq-len", str(cfg["seq_len"]), "--batch-size", str(cfg["batch_size"])]
    done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"quanto {weights} failed: {done.stderr[-2000:]}")
    return json.loads(result.read_text())


def add_peers(results: dict, model: Path, text: Path, work: Path) -> None:
    """optimum-quanto int4 (its default: group 128, asymmetric) and int8 (per channel) beside rows 2 and 3."""
    rows = {r["row"]: r for r in results["rows"]}
    try:
        py = ensure_quanto_venv(work)
        for weights, row in (("qint4", "SmolLM2 RTN int4 g64 sym"), ("qint8", "SmolLM2 RTN int8 per-channel sym")):
            rows[row]["peer_quanto"] = quanto_peer(py, model, text, weights, results["config"], work)
    except (OSError, subprocess.CalledProcessError, RuntimeError, StopIteration) as e:
        results.setdefault("peer_errors", []).append(f"optimum-quanto skipped: {str(e).splitlines()[-1] if str(e) else type(e).__name__}")


def peer_cell(r: dict, base: float | None) -> str:
    q = r.get("peer_quanto")
    if not q:
        return "–"
    grid = "int4 g128 asym" if q["weights"] == "qint4" else "int8 per-channel sym"
    ratio = f", ×{q['perplexity'] / base:.4f}" if base else ""
    ours = (r.get("eval") or {}).get("perplexity")
    vs = f"; qtool/quanto ppl {ours / q['perplexity']:.3f}" if ours else ""
    return f"quanto {q['version']} {grid}: ppl {q['perplexity']:.3f}{ratio}{vs}"


# -- report ----------------------------------------------------------------------------------------
def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def markdown(results: dict) -> str:
    cfg, rows, info = results["config"], results["rows"], results["machine"]
    base = next((r["eval"]["perplexity"] for r in rows if r.get("eval") and r["bpw"] == 16.0), None)
    lines = [
        f"qtool bench — {info['date_utc']}, {info['cpus_usable']} CPU(s) ({info['cpu_model']}), torch {info['torch']}, "
        f"transformers {info['transformers']}, qtool {info['qtool']} ({info['git_commit'][:8]}{'+dirty' if info['git_dirty'] else ''})",
        "",
        f"Perplexity: {cfg['windows']} non-overlapping windows × {cfg['seq_len']} tokens of the second half of "
        f"{cfg['text_name']} (no calibration), models loaded by transformers in float32. "
        "Wall time and peak RSS are those of the `qtool quantize` child process alone (kernel ru_maxrss).",
        "",
        "| # | model / recipe | format | quantize wall | peak RSS | size on disk | bpw | perplexity | ppl / bf16 | RSS < 1.5 GiB | peers |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        ev = r.get("eval") or {}
        ppl = ev.get("perplexity")
        ratio = f"{ppl / base:.4f}" if ppl and base else "–"
        passed = "–" if "rss_pass" not in r else ("**pass**" if r["rss_pass"] else "**FAIL**")
        fmt = "safetensors" if r["bpw"] == 16.0 else "compressed-tensors"
        wall = f"{r['wall_s']:.1f} s" if "wall_s" in r else "–"
        ppl_s = f"{ppl:.3f}" if ppl else "–"
        lines.append(
            f"| {i} | {r['row']} | {fmt} | {wall} | {fmt_bytes(r.get('peak_rss_bytes'))} "
            f"| {fmt_bytes(r['size_bytes'])} | {r['bpw']:.3f} | {ppl_s} | {ratio} | {passed} | {peer_cell(r, base)} |"
        )
    notes = results.get("notes", [])
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    if results.get("gguf"):
        lines += ["", gguf_bench.markdown(results["gguf"]).rstrip("\n")]
    if results.get("gptq"):
        lines += ["", gptq_bench.markdown(results["gptq"]).rstrip("\n")]
    if results.get("awq"):
        lines += ["", awq_bench.markdown(results["awq"]).rstrip("\n")]
    if results.get("calibration"):
        lines += ["", calib_bench.markdown(results["calibration"]).rstrip("\n")]
    if results.get("arch"):
        lines += ["", arch_bench.markdown(results["arch"]).rstrip("\n")]
    if results.get("otf"):
        lines += ["", otf_bench.markdown(results["otf"]).rstrip("\n")]
    if results.get("distributed"):
        lines += ["", dist_bench.markdown(results["distributed"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def notes_for(results: dict) -> list[str]:
    notes = []
    floor = results.get("import_floor")
    if floor:
        notes.append(f"Import floor (python + torch + transformers + qtool, nothing loaded): peak RSS {fmt_bytes(floor['peak_rss_bytes'])}.")
    for r in results["rows"]:
        if "sampled_peak_rss_anon_bytes" in r:
            notes.append(
                f"{r['row']}: peak RSS {fmt_bytes(r['peak_rss_bytes'])} (kernel); sampled: VmHWM {fmt_bytes(r['sampled_vm_hwm_bytes'])}, "
                f"peak RssAnon {fmt_bytes(r['sampled_peak_rss_anon_bytes'])}, peak RssFile {fmt_bytes(r['sampled_peak_rss_file_bytes'])} "
                "(file-backed: shared libraries and the mmap'd input)."
            )
        diff = (r.get("eval") or {}).get("max_abs_diff_vs_qtool_dequant")
        if diff is not None:
            notes.append(f"{r['row']}: max |W| difference, transformers' decompression vs qtool's reference dequantization: {diff:.3g}.")
    if results.get("gguf_merged_from_earlier_run"):
        notes.append("The rows above come from an earlier run (see the date at the top); the GGUF section below was run "
                     f"alone with --gguf-only on {results['gguf_run_date_utc']}.")
    notes.append(f"Bench wall time: {results['bench_seconds']:.0f} s; load average at start {results['machine']['load_average_at_start'][0]:.2f} "
                 "(other jobs on the machine inflate wall times).")
    if any(r.get("peer_quanto") for r in results["rows"]):
        notes.append("Peers (optional for RTN rows): optimum-quanto, data-free, run in this bench on the same windows; "
                     "scored in memory (its QLinears swapped for dense Linears holding its own dequantized weights), "
                     "so it has no time/RSS/size entries.")
    notes += results.get("peer_errors", []) or ([] if results.get("peers_run") else ["Peers: not run (--no-peers)."])
    return notes


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests/bench/results", help="folder for results.json and results.md")
    ap.add_argument("--datasets", type=Path, default=REPO.parent / "shared/datasets", help=f"folder holding {TEXT_FILE}")
    ap.add_argument("--model", type=Path, default=None, help="bf16 model folder (default: $QTOOL_CACHE/SmolLM2-135M-Instruct-bf16)")
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows (default 40)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    ap.add_argument("--skip-1b", action="store_true", help="leave out the 1.1B peak-RSS row")
    ap.add_argument("--no-peers", action="store_true", help="leave out the optimum-quanto comparison")
    ap.add_argument("--no-gguf", action="store_true", help="leave out the GGUF vs llama.cpp section")
    ap.add_argument("--gguf-only", action="store_true",
                    help="run only the GGUF section; merge it into --out/results.json of an earlier run if there is one")
    ap.add_argument("--gguf-chunks", type=int, default=gguf_bench.DEFAULT_CHUNKS,
                    help=f"llama-perplexity chunks of 512 tokens per GGUF file (default {gguf_bench.DEFAULT_CHUNKS})")
    ap.add_argument("--no-gptq", action="store_true", help="leave out the GPTQ vs GPTQModel section")
    ap.add_argument("--gptq-only", action="store_true",
                    help="run only the GPTQ section; merge it into --out/results.json of an earlier run if there is one")
    ap.add_argument("--no-arch", action="store_true", help="leave out the random qwen3_moe / gemma3_text section")
    ap.add_argument("--arch-only", action="store_true",
                    help="run only the architectures section (kept in --out/arch.json, merged into results.json)")
    ap.add_argument("--otf", action="store_true", help="also run the on-the-fly formats section (long: ~26 venv processes)")
    ap.add_argument("--otf-only", action="store_true",
                    help="run only the on-the-fly section (kept in --out/otf.json, merged into results.json)")
    ap.add_argument("--otf-windows", type=int, default=otf_bench.DEFAULT_WINDOWS,
                    help=f"512-token held-out windows per on-the-fly row (default {otf_bench.DEFAULT_WINDOWS})")
    ap.add_argument("--otf-cases", default=None, help=f"comma-separated subset of {', '.join(otf_bench.CASES)}")
    ap.add_argument("--otf-merge", action="store_true",
                    help="with --otf-only --otf-cases: keep the other rows of --out/otf.json (tagged with their own run)")
    ap.add_argument("--aqlm", action="store_true", help="add the AQLM ~2-bit section (aqlm_bench.py; hours on a 2-core CPU)")
    ap.add_argument("--no-calibration", action="store_true", help="leave out the `qtool calibrate` rows (run alone: calib_bench.py)")
    ap.add_argument("--dist", action="store_true", help="add the 1-vs-2-processes section (optional; run alone: dist_bench.py)")
    ap.add_argument("--gptq-samples", type=int, default=gptq_bench.DEFAULT_SAMPLES,
                    help=f"GPTQ calibration windows (default {gptq_bench.DEFAULT_SAMPLES})")
    ap.add_argument("--gptq-seq-len", type=int, default=gptq_bench.DEFAULT_SEQ_LEN,
                    help=f"tokens per GPTQ calibration window (default {gptq_bench.DEFAULT_SEQ_LEN})")
    ap.add_argument("--gptq-windows", type=int, default=gptq_bench.DEFAULT_WINDOWS,
                    help=f"512-token evaluation windows per GPTQ row (default {gptq_bench.DEFAULT_WINDOWS})")
    ap.add_argument("--gptq-peers", choices=gptq_bench.PEER_CHOICES, default="all",
                    help="GPTQModel runs: all (every recipe + its defaults at int4 g128), matched, w4g128 or none")
    ap.add_argument("--gptq-recipes", default=None,
                    help=f"comma-separated subset of {', '.join(r.key for r in gptq_bench.RECIPES)} (default all)")
    ap.add_argument("--gptq-no-as-shipped", action="store_true", help="leave out the int4 g128 run without OMP_WAIT_POLICY")
    ap.add_argument("--no-awq", action="store_true", help="leave out the AWQ / GPTQ-defaults section")
    ap.add_argument("--awq-only", action="store_true",
                    help="run only the AWQ / GPTQ-defaults section; merge it into --out/results.json of an earlier run")
    ap.add_argument("--awq-samples", type=int, default=awq_bench.DEFAULT_SAMPLES,
                    help=f"AWQ-section calibration windows, every tool (default {awq_bench.DEFAULT_SAMPLES})")
    ap.add_argument("--awq-seq-len", type=int, default=awq_bench.DEFAULT_SEQ_LEN, help="tokens per AWQ-section calibration window")
    ap.add_argument("--awq-windows", type=int, default=awq_bench.DEFAULT_WINDOWS, help="512-token evaluation windows per AWQ-section row")
    ap.add_argument("--awq-rows", default=None,
                    help="comma-separated setting:row to run, in that order (e.g. w4g128:gptq-d01,w4g64:llmcompressor-awq); default all")
    ap.add_argument("--awq-no-peers", action="store_true", help="AWQ section without GPTQModel and llm-compressor")
    ap.add_argument("--awq-reuse-peers", action="store_true",
                    help="re-score llm-compressor's folder of an earlier run on the same calibration ids instead of re-running it")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    model = args.model or cache_dir() / "SmolLM2-135M-Instruct-bf16"
    text = args.datasets / TEXT_FILE
    for p, how in ((model / "config.json", "run `make model`"), (text, "pass --datasets")):
        if not p.is_file():
            print(f"run_bench: {p} not found; {how}", file=sys.stderr)
            return 2
    work = cache_dir() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    if args.no_gguf and args.gguf_only or args.no_gptq and args.gptq_only or args.gguf_only and args.gptq_only:
        print("run_bench: --no-gguf/--gguf-only/--no-gptq/--gptq-only: at most one section alone, and not also left out", file=sys.stderr)
        return 2
    if args.gguf_only:
        return gguf_only(args, model, text, work, t0)
    if args.gptq_only:
        return gptq_only(args, model, text, work, t0)
    if args.arch_only:
        return arch_only(args, model, text, work, t0)
    if args.otf_only:
        return otf_only(args, model, text, work, t0)
    if args.awq_only:
        return awq_only(args, model, text, work, t0)
    torch.manual_seed(0)
    results: dict = {
        "machine": machine_info(),
        "config": {"model": str(model), "text": str(text), "text_name": TEXT_FILE, "part": "eval (second half)",
                   "windows": args.windows, "seq_len": args.seq_len, "batch_size": args.batch_size},
        "rows": [],
    }
    windows = load_windows(model, text, args.seq_len, args.windows)
    results["config"]["windows"] = int(windows.shape[0])
    results["import_floor"] = floor_row()
    rows = results["rows"]
    rows.append(bf16_row(model, windows, args.batch_size))
    rows.append(rtn_row("SmolLM2 RTN int4 g64 sym", model, work / "smollm2-rtn-int4-g64", ["-m", "rtn", "-b", "4", "-g", "64"], windows, args.batch_size))
    rows.append(rtn_row("SmolLM2 RTN int8 per-channel sym", model, work / "smollm2-rtn-int8-channel", ["-m", "rtn", "-b", "8", "-g", "channel"], windows, args.batch_size))
    if not args.skip_1b:
        rows.append(big_rss_row(work))
    if not args.no_peers:
        add_peers(results, model, text, work)
        results["peers_run"] = True
    if not args.no_gguf:
        results["gguf"] = run_gguf(args, model, text, work)
    if not args.no_gptq:
        results["gptq"] = run_gptq(args, model, text, work)
    if not args.no_arch:
        results["arch"] = arch_bench.run_arch_section(model, work, qtool_exe(), child_env())
    if args.otf:
        results["otf"] = run_otf(args, model, text, work)
    if not args.no_awq:
        results["awq"] = run_awq(args, model, text, work)
    if not args.no_calibration:
        results["calibration"] = calib_bench.run_calibration_section(model, text, work, qtool_exe(), child_env(), skip_1b=args.skip_1b)
    if args.aqlm:
        import aqlm_bench

        results["aqlm"] = aqlm_bench.run_section(model, text, work / "aqlm", samples=32, seq_len=512, windows=args.windows)
    if args.dist:
        from gguf_bench import random_llama_with_tokenizer

        models = {dist_bench.SMOL: model, dist_bench.BIG: lambda: random_llama_with_tokenizer(work, model)[0]}
        results["distributed"] = dist_bench.run_dist_section(models, text, work / "dist", qtool_exe(), child_env())
    results["bench_seconds"] = time.perf_counter() - t0
    return write_results(args.out, results)


def run_gguf(args: argparse.Namespace, model: Path, text: Path, work: Path) -> dict:
    gc.collect()
    return gguf_bench.run_gguf_section(model, text, work, qtool_exe(), child_env(), chunks=args.gguf_chunks, skip_1b=args.skip_1b)


def run_gptq(args: argparse.Namespace, model: Path, text: Path, work: Path) -> dict:
    gc.collect()
    return gptq_bench.run_gptq_section(model, text, work, qtool_exe(), child_env(), samples=args.gptq_samples,
                                       seq_len=args.gptq_seq_len, windows=args.gptq_windows, peers=args.gptq_peers,
                                       recipes=args.gptq_recipes.split(",") if args.gptq_recipes else None,
                                       as_shipped=not args.gptq_no_as_shipped)


def gptq_only(args: argparse.Namespace, model: Path, text: Path, work: Path, t0: float) -> int:
    """The GPTQ section alone: kept in --out/gptq.json, then put into results.json as it is when the
    section is done (its other sections kept as they are; the section takes a while)."""
    section = run_gptq(args, model, text, work)
    section["run_seconds_with_setup"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gptq.json").write_text(json.dumps(section, indent=2, default=str) + "\n")
    results, _ = earlier_results(args, model, text)
    results["gptq"] = section
    return write_results(args.out, results)


def arch_only(args: argparse.Namespace, model: Path, text: Path, work: Path, t0: float) -> int:
    """The architectures section alone: kept in --out/arch.json, then put into results.json."""
    section = arch_bench.run_arch_section(model, work, qtool_exe(), child_env())
    section["run_seconds_with_setup"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "arch.json").write_text(json.dumps(section, indent=2, default=str) + "\n")
    results, _ = earlier_results(args, model, text)
    results["arch"] = section
    return write_results(args.out, results)


def run_otf(args: argparse.Namespace, model: Path, text: Path, work: Path, partial: Path | None = None) -> dict:
    cases = args.otf_cases.split(",") if args.otf_cases else None
    return otf_bench.run_otf_section(model, text, work, qtool_exe(), child_env(), windows=args.otf_windows,
                                     batch_size=args.batch_size, cases=cases, partial=partial)


def otf_only(args: argparse.Namespace, model: Path, text: Path, work: Path, t0: float) -> int:
    """The on-the-fly section alone: --out/otf.json (rewritten after each method), then into results.json."""
    args.out.mkdir(parents=True, exist_ok=True)
    earlier = json.loads((args.out / "otf.json").read_text()) if args.otf_merge and (args.out / "otf.json").is_file() else None
    section = run_otf(args, model, text, work, partial=args.out / ("otf.partial.json" if earlier else "otf.json"))
    section["run_seconds_with_setup"] = round(time.perf_counter() - t0, 1)
    if earlier:
        (args.out / "otf.partial.json").unlink(missing_ok=True)
        section = otf_bench.merge_sections(earlier, section)
    (args.out / "otf.json").write_text(json.dumps(section, indent=2, default=str) + "\n")
    results, _ = earlier_results(args, model, text)
    results["otf"] = section
    return write_results(args.out, results)


def run_awq(args: argparse.Namespace, model: Path, text: Path, work: Path, save=None) -> dict:
    gc.collect()
    return awq_bench.run_awq_section(model, text, work, qtool_exe(), child_env(), samples=args.awq_samples,
                                     seq_len=args.awq_seq_len, windows=args.awq_windows, peers=not args.awq_no_peers,
                                     reuse_peers=args.awq_reuse_peers, save=save,
                                     only=args.awq_rows.split(",") if args.awq_rows else None)


def awq_only(args: argparse.Namespace, model: Path, text: Path, work: Path, t0: float) -> int:
    """The AWQ section alone: kept in --out/awq.json (rewritten after every row, so a cut-off run keeps
    what it did), then put into results.json with its other sections as they are."""
    args.out.mkdir(parents=True, exist_ok=True)

    def save(sec: dict) -> None:
        (args.out / "awq.json").write_text(json.dumps(sec, indent=2, default=str) + "\n")

    section = run_awq(args, model, text, work, save=save)
    section["machine"] = machine_info()
    section["run_seconds_with_setup"] = round(time.perf_counter() - t0, 1)
    save(section)
    results, _ = earlier_results(args, model, text)
    results["awq"] = section
    return write_results(args.out, results)


def earlier_results(args: argparse.Namespace, model: Path, text: Path) -> tuple[dict, bool]:
    """--out/results.json of an earlier full run, to put one section into (True), else a new skeleton."""
    previous = args.out / "results.json"
    results = json.loads(previous.read_text()) if previous.is_file() else None
    if results and "rows" in results:
        return results, True
    return {"machine": machine_info(), "config": {"model": str(model), "text": str(text), "text_name": TEXT_FILE,
            "part": "eval (second half)", "windows": 0, "seq_len": args.seq_len, "batch_size": args.batch_size},
            "rows": [], "bench_seconds": 0.0}, False


def write_results(out: Path, results: dict) -> int:
    results["notes"] = notes_for(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = markdown(results)
    (out / "results.md").write_text(md)
    print(md)
    return 0


def gguf_only(args: argparse.Namespace, model: Path, text: Path, work: Path, t0: float) -> int:
    """The GGUF section alone, put into the earlier run's results.json (its other rows kept as they were)."""
    results, earlier = earlier_results(args, model, text)
    if earlier:
        results["gguf_merged_from_earlier_run"] = True
    results["gguf_run_date_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    results["gguf"] = run_gguf(args, model, text, work)
    results["gguf"]["run_seconds_with_setup"] = round(time.perf_counter() - t0, 1)
    return write_results(args.out, results)


if __name__ == "__main__":
    sys.exit(main())
