"""Speed bench: HF folder -> GGUF, qtool vs llama.cpp, and qtool's start-up / inspect costs.

    python tests/bench/speed_bench.py [--models smollm2,llama1b] [--types Q4_K_M,Q8_0,Q4_0] [--reps 2]
                                      [--out tests/bench/results]

A. End to end, HF folder (bf16 safetensors) -> GGUF of one type: `qtool quantize -f gguf -t TYPE`
   vs llama.cpp's `convert_hf_to_gguf.py --outtype bf16` + `llama-quantize bf16.gguf out TYPE`
   (built under $QTOOL_CACHE/llama.cpp, tests/llama_cpp_tools.py). The runs alternate
   (qtool, llama.cpp, qtool, llama.cpp, ...) so that the load of a shared machine falls on both;
   each row reports the median wall time, the median CPU time (user+sys of the child, from
   wait4) and the peak RSS. The ratio column is qtool / llama.cpp of the median walls (the goal:
   <= 0.8). Every qtool file is compared with llama.cpp's, tensor by tensor (type and bytes).
B. `qtool --help` CPU time; `qtool inspect` wall and peak RSS on GGUF and safetensors inputs, and
   the RSS of a bare interpreter for reference.

The models: SmolLM2-135M-Instruct (bf16, $QTOOL_CACHE/SmolLM2-135M-Instruct-bf16) and the bench's
random ~1.1B llama with SmolLM2's tokenizer ($QTOOL_CACHE/bench/random-llama-1b-tok, see
gguf_bench.py; built there when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

CACHE = Path(os.environ.get("QTOOL_CACHE", REPO / ".cache"))

from measure import run_measured  # noqa: E402


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd`; wall, CPU (user+sys) and peak RSS of that child alone. Measured from a fresh small
    helper process (measure.py): forked straight from this bench, whose RSS grows as it compares
    GGUF files, a child's ru_maxrss would start from the bench's high-water mark."""
    m = run_measured(cmd, env=env)
    if m.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({m.returncode}): {m.stderr[-2000:]}")
    return {"wall_s": m.wall_s, "cpu_s": m.cpu_s, "rss_mib": m.peak_rss_bytes / 2**20}


def qtool_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "qtool", *map(str, args)]


def env_qtool() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def compare_gguf(a: Path, b: Path) -> str:
    import gguf
    import numpy as np

    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    if ta.keys() != tb.keys():
        return f"different tensor names ({len(ta)} vs {len(tb)})"
    same = sum(ta[n].tensor_type == tb[n].tensor_type
               and np.array_equal(np.asarray(ta[n].data).view(np.uint8), np.asarray(tb[n].data).view(np.uint8))
               for n in ta)
    return f"{'identical' if same == len(ta) else 'DIFFERENT'} ({same}/{len(ta)} tensors: types and bytes)"


def models(names: list[str]) -> dict[str, Path]:
    out = {}
    for n in names:
        if n == "smollm2":
            out[n] = CACHE / "SmolLM2-135M-Instruct-bf16"
        elif n == "llama1b":
            p = CACHE / "bench" / "random-llama-1b-tok"
            if not (p / "config.json").is_file():
                raise SystemExit(f"{p} is missing: `python tests/bench/run_bench.py --gguf-only` builds it")
            out[n] = p
        else:
            raise SystemExit(f"unknown model {n!r}")
    return out


def convert_env(tools) -> dict:
    """The environment llama.cpp's convert_hf_to_gguf.py runs in: its own gguf-py, offline."""
    return {**os.environ, "PYTHONPATH": str(tools.gguf_py), "HF_HUB_OFFLINE": "1"}


def warm_up(folder: Path, work: Path) -> None:
    """One untimed run of each tool before any timed one: the first run of a fresh checkout byte-compiles
    its Python sources and reads the model from disk (measured: qtool 13.0 s cold vs 4.9 s warm on
    SmolLM2 Q4_K_M, llama.cpp's convert 11.2 vs 6.6 s), which the first timed pair would otherwise carry."""
    from llama_cpp_tools import ensure_llama_cpp

    tools = ensure_llama_cpp(CACHE)
    conv_env = convert_env(tools)
    out = work / "warm-up.gguf"
    subprocess.run(qtool_cmd("quantize", folder, "-f", "gguf", "-t", "Q4_K_M", "-o", out, "--overwrite"), env=env_qtool(),
                   check=True, capture_output=True)
    subprocess.run([str(tools.python), str(tools.convert_script), str(folder), "--outfile", str(out), "--outtype", "bf16"],
                   env=conv_env, check=True, capture_output=True)
    out.unlink(missing_ok=True)


def bench_gguf(name: str, folder: Path, qtype: str, reps: int, work: Path) -> dict:
    from llama_cpp_tools import ensure_llama_cpp

    tools = ensure_llama_cpp(CACHE)
    conv_env = convert_env(tools)
    q_out, bf16, l_out = work / f"{name}-qtool-{qtype}.gguf", work / f"{name}-bf16.gguf", work / f"{name}-llama-{qtype}.gguf"
    runs: dict[str, list[dict]] = {"qtool": [], "convert": [], "quantize": [], "llama.cpp": []}
    for _ in range(reps):
        runs["qtool"].append(timed(qtool_cmd("quantize", folder, "-f", "gguf", "-t", qtype, "-o", q_out, "--overwrite"),
                                   env_qtool()))
        c = timed([str(tools.python), str(tools.convert_script), str(folder), "--outfile", str(bf16),
                   "--outtype", "bf16"], conv_env)
        q = timed([str(tools.quantize), str(bf16), str(l_out), qtype])
        runs["convert"].append(c)
        runs["quantize"].append(q)
        runs["llama.cpp"].append({"wall_s": c["wall_s"] + q["wall_s"], "cpu_s": c["cpu_s"] + q["cpu_s"],
                                  "rss_mib": max(c["rss_mib"], q["rss_mib"])})
        bf16.unlink()
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "cpu_s", "rss_mib")} for k, v in runs.items()}
    same = compare_gguf(q_out, l_out)
    for p in (q_out, l_out):
        p.unlink()
    return {"model": name, "type": qtype, "reps": reps, "median": med, "runs": runs, "files": same,
            "ratio_wall": med["qtool"]["wall_s"] / med["llama.cpp"]["wall_s"],
            "ratio_cpu": med["qtool"]["cpu_s"] / med["llama.cpp"]["cpu_s"]}


def bench_startup(work: Path, gguf_files: list[Path], st_dirs: list[Path], reps: int) -> dict:
    env = env_qtool()
    bare = [timed([sys.executable, "-c", "pass"]) for _ in range(reps)]
    out = {"bare_python_rss_mib": min(r["rss_mib"] for r in bare),
           "help": [timed(qtool_cmd("--help"), env) for _ in range(reps)], "inspect": {}}
    out["size_mib"] = {}
    for p in [*gguf_files, *st_dirs]:
        if p.exists():
            out["inspect"][str(p)] = [timed(qtool_cmd("inspect", p), env) for _ in range(reps)]
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
            out["size_mib"][str(p)] = size / 2**20
    return out


def report(gg: list[dict], st: dict | None, started: str, load: float, wall: float) -> str:
    lines = [f"## Speed: HF folder -> GGUF, qtool vs llama.cpp; start-up and inspect\n",
             f"{started}, {os.cpu_count()} CPU(s) ({platform.processor() or platform.machine()}), load average at start "
             f"{load:.2f}, {wall:.0f} s in all. `python tests/bench/speed_bench.py` (medians of alternating runs after one untimed warm-up run of each tool; "
             "CPU = user+sys of the child; llama.cpp = convert_hf_to_gguf --outtype bf16 + llama-quantize, walls and CPU "
             "summed, RSS the larger).\n",
             "| model | type | runs | qtool wall | qtool CPU | qtool RSS | llama.cpp wall (convert + quantize) | llama.cpp CPU | llama.cpp RSS | wall qtool/llama.cpp | CPU qtool/llama.cpp | goal ≤ 0.8× | files |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in gg:
        m = r["median"]
        lines.append(
            f"| {r['model']} | {r['type']} | {r['reps']} | {m['qtool']['wall_s']:.1f} s | {m['qtool']['cpu_s']:.1f} s | "
            f"{m['qtool']['rss_mib']:.0f} MiB | {m['llama.cpp']['wall_s']:.1f} s ({m['convert']['wall_s']:.1f} + "
            f"{m['quantize']['wall_s']:.1f}) | {m['llama.cpp']['cpu_s']:.1f} s | {m['llama.cpp']['rss_mib']:.0f} MiB | "
            f"**{r['ratio_wall']:.2f}×** | {r['ratio_cpu']:.2f}× | {'pass' if r['ratio_wall'] <= 0.8 else '**missed**'} | {r['files']} |")
    if st:
        lines += ["", f"Start-up (bare interpreter peak RSS {st['bare_python_rss_mib']:.0f} MiB):", "",
                  "| command | wall (median) | CPU (median) | peak RSS | RSS above the interpreter | goal |", "|---|---:|---:|---:|---:|---|"]
        h = st["help"]
        cpu = statistics.median(r["cpu_s"] for r in h)
        lines.append(f"| `qtool --help` | {statistics.median(r['wall_s'] for r in h):.2f} s | {cpu:.2f} s | "
                     f"{max(r['rss_mib'] for r in h):.0f} MiB | – | CPU ≤ 0.5 s: {'pass' if cpu <= 0.5 else '**missed**'} |")
        for p, rs in st["inspect"].items():
            w = statistics.median(r["wall_s"] for r in rs)
            rss = max(r["rss_mib"] for r in rs)
            above = rss - st["bare_python_rss_mib"]
            ok = w <= 1.0 and above <= 150
            lines.append(f"| `qtool inspect {Path(p).name}` ({st['size_mib'][p]:.0f} MiB) | {w:.2f} s | "
                         f"{statistics.median(r['cpu_s'] for r in rs):.2f} s | {rss:.0f} MiB | {above:.0f} MiB | "
                         f"≤ 1 s, ≤ 150 MiB: {'pass' if ok else '**missed**'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,llama1b")
    ap.add_argument("--types", default="Q4_K_M,Q8_0,Q4_0")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--big-types", default=None, help="types for the 1.1B (default: --types)")
    ap.add_argument("--no-startup", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "bench" / "results")
    a = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    load = os.getloadavg()[0]
    t0 = time.time()
    gg = []
    with tempfile.TemporaryDirectory(prefix="qtool-speed-", dir=os.environ.get("QTOOL_BENCH_TMP")) as d:
        work = Path(d)
        chosen = models(a.models.split(","))
        warm_up(next(iter(chosen.values())), work)
        for name, folder in chosen.items():
            types = (a.big_types or a.types) if name != "smollm2" else a.types
            for qtype in types.split(","):
                r = bench_gguf(name, folder, qtype, a.reps, work)
                print(json.dumps({k: r[k] for k in ("model", "type", "ratio_wall", "ratio_cpu", "files")}), flush=True)
                gg.append(r)
        st = None
        if not a.no_startup:
            smol = CACHE / "SmolLM2-135M-Instruct-bf16"
            q = work / "smollm2-Q4_K_M.gguf"
            subprocess.run(qtool_cmd("quantize", smol, "-f", "gguf", "-t", "Q4_K_M", "-o", q), env=env_qtool(),
                           check=True, capture_output=True)
            st = bench_startup(work, [q, CACHE / "bench" / "gemma3-vocab262k.gguf"],
                               [smol, CACHE / "bench" / "random-llama-1b-tok"], max(3, a.reps))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "speed.json").write_text(json.dumps({"started": started, "load": load, "gguf": gg, "startup": st}, indent=1))
    md = report(gg, st, started, load, time.time() - t0)
    (a.out / "speed.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
