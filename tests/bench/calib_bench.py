"""Calibration rows of `make bench`: `qtool calibrate` time, peak RSS and file size, on SmolLM2 and
on a random ~1.1 B Llama (32 samples x 512 tokens, the issue's memory budget: 3 GiB).

    python tests/bench/calib_bench.py --out tests/bench/results   (merges a "calibration" section
                                                                    into results.json / results.md)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import run_measured  # noqa: E402
from gguf_bench import random_llama_with_tokenizer  # noqa: E402

GIB = 1 << 30
CALIB_RSS_BUDGET = 3 * GIB
SAMPLES, SEQ_LEN = 32, 512


def calibrate_row(label: str, model: Path, text: Path, out: Path, qtool: str, env: dict, *, budget: int | None = None) -> dict:
    cmd = [qtool, "calibrate", str(model), "--dataset", str(text), "--samples", str(SAMPLES), "--seq-len", str(SEQ_LEN),
           "-o", str(out), "--overwrite", "--json"]
    m = run_measured(cmd, env=env)
    if m.returncode != 0:
        return {"row": label, "command": m.cmd, "error": (m.stderr or "").strip().splitlines()[-1:] or ["failed"]}
    report = json.loads(m.stdout)
    row = {
        "row": label,
        "command": m.cmd,
        "samples": SAMPLES,
        "seq_len": SEQ_LEN,
        "tokens": report["tokens"],
        "linears": report["modules"],
        "distinct_inputs": report["distinct_inputs"],
        "seconds": round(m.wall_s, 1),
        "peak_rss_bytes": m.peak_rss_bytes,
        "stats_bytes": out.stat().st_size,
    }
    if budget is not None:
        row |= {"rss_budget_bytes": budget, "rss_pass": m.peak_rss_bytes < budget}
    out.unlink(missing_ok=True)  # hundreds of MB to GBs that nothing reuses
    return row


def run_calibration_section(model: Path, text: Path, work: Path, qtool: str, env: dict, *, skip_1b: bool = False) -> dict:
    rows = [calibrate_row("SmolLM2-135M: qtool calibrate", model, text, work / "smollm2.stats.safetensors", qtool, env)]
    if not skip_1b:
        big, _ = random_llama_with_tokenizer(work, model)  # calibration needs a tokenizer: SmolLM2's
        rows.append(calibrate_row("random Llama 1.1B: qtool calibrate", big, text, work / "llama-1b.stats.safetensors",
                                  qtool, env, budget=CALIB_RSS_BUDGET))
    return {"rows": rows}


def markdown(section: dict) -> str:
    lines = ["## Calibration (`qtool calibrate`, Hessians + per-channel statistics)", "",
             "| row | windows | linears (distinct inputs) | time | tokens/s | peak RSS | stats file | budget |",
             "|---|---|---|---|---|---|---|---|"]
    for r in section["rows"]:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {' '.join(r['error'])} | | | | | | |")
            continue
        budget = "" if "rss_budget_bytes" not in r else \
            f"{'pass' if r['rss_pass'] else 'FAIL'} (< {r['rss_budget_bytes'] / GIB:.0f} GiB)"
        lines.append(f"| {r['row']} | {r['samples']} x {r['seq_len']} | {r['linears']} ({r['distinct_inputs']}) | "
                     f"{r['seconds']:.1f} s | {r['samples'] * r['seq_len'] / r['seconds']:.1f} | {r['peak_rss_bytes'] / (1 << 20):.0f} MiB | {r['stats_bytes'] / (1 << 20):.0f} MiB | {budget} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import run_bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=run_bench.REPO / "tests/bench/results")
    ap.add_argument("--datasets", type=Path, default=run_bench.REPO.parent / "shared/datasets")
    ap.add_argument("--skip-1b", action="store_true")
    args = ap.parse_args(argv)
    model = run_bench.cache_dir() / "SmolLM2-135M-Instruct-bf16"
    work = run_bench.cache_dir() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    section = run_calibration_section(model, args.datasets / run_bench.TEXT_FILE, work, run_bench.qtool_exe(),
                                      run_bench.child_env(), skip_1b=args.skip_1b)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(json.dumps(section, indent=2) + "\n")  # kept even if the merge fails
    print(markdown(section))
    results_path = args.out / "results.json"
    if results_path.is_file():  # merge into the last full run's table
        results = json.loads(results_path.read_text())
        results["calibration"] = section
        return run_bench.write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
