"""Calibrated methods at ~1 B parameters: peak RSS of AWQ and learned rounding on the bench's random
Llama 1.1 B (bf16, SmolLM2's tokenizer) with 128 x 512 calibration tokens, against the issues' budgets
(AWQ ≤ 3 GiB, issue 9; learned rounding ≤ 4 GiB, issue 10).

    python tests/bench/scale_bench.py [--rows awq-block0,autoround-iters2] [--out tests/bench/results]

A full run at the methods' default settings takes many hours on a 2-core CPU (AWQ's 20-point scale
grid and 20-point clipping search on 65,536 tokens: ~240 TFLOP per block; learned rounding's 200
steps of a block forward + backward on 8 x 512 tokens: ~1 TFLOP each), so each row cuts one axis
that does not change what is held in memory, and says which:

* `awq-block0`: AWQ at its defaults, 128 x 512, only block 0's linears quantized (`--target`); the
  engine stops computing after the last targeted block (blocks 1..21 pass through as stored). The
  peak of a block repeats block after block (the same shapes); the row gives the time of one block.
* `awq-grid2`: AWQ at 128 x 512, every block, with 2-point scale and clipping grids instead of 20
  (the activation stores, the statistics and the search's buffers per grid point are those of the
  defaults; only the number of points changes): the full-depth peak, which block 0 alone cannot show
  (memory left over from earlier blocks).
* `autoround-iters2`: learned rounding at 128 x 512, every block, 2 iterations instead of 200 (the
  activation stores, the float model's stream and one batch's autograd graph are what they are at
  200); the row gives the seconds per block, from which the 200-iteration time is estimated.

Each run is one `qtool quantize` process measured by measure.py (wall, kernel peak RSS), with
OMP_WAIT_POLICY=PASSIVE as in every bench section. Output: scale.json and scale.md in --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gptq_bench as gb  # noqa: E402
import run_bench  # noqa: E402
from gguf_bench import qtool_state, random_llama_with_tokenizer  # noqa: E402

GIB = 1 << 30
SAMPLES, SEQ_LEN = 128, 512
ROWS = {
    "awq-block0": dict(label="AWQ W4 g128 asym (defaults: 20-point scale grid, clipping search), block 0 of 22",
                       flags=["-m", "awq", "-b", "4", "-g", "128", "--target", "model.layers.0.*"],
                       fmt="compressed-tensors", budget=3 * GIB, issue=9),
    "awq-grid2": dict(label="AWQ W4 g128 asym, all 22 blocks, 2-point scale and clipping grids (defaults: 20)",
                      flags=["-m", "awq", "-b", "4", "-g", "128", "--alpha-grid", "2", "--clip-grid", "2"],
                      fmt="compressed-tensors", budget=3 * GIB, issue=9),
    "autoround-iters2": dict(label="learned rounding W4 g128 sym, all 22 blocks, 2 iterations per block (batch 8)",
                             flags=["-m", "autoround", "-b", "4", "-g", "128", "--iters", "2"],
                             fmt="gptq", budget=4 * GIB, issue=10, iters=2, full_iters=200),
    "autoround-block0": dict(label="learned rounding W4 g128 sym, block 0 of 22, 2 iterations (batch 8)",
                             flags=["-m", "autoround", "-b", "4", "-g", "128", "--iters", "2", "--target", "model.layers.0.*"],
                             fmt="compressed-tensors", budget=4 * GIB, issue=10),
}


def measure_row(key: str, model: Path, text: Path, work: Path, qtool: str, env: dict) -> dict:
    spec = ROWS[key]
    out = work / key
    cmd = [qtool, "quantize", str(model), *spec["flags"], "--dataset", str(text), "--samples", str(SAMPLES),
           "--seq-len", str(SEQ_LEN), "-f", spec["fmt"], "-o", str(out), "--overwrite", "--json"]
    m, row = gb._measured(cmd, env, run_bench.REPO)
    report = json.loads(m.stdout)
    row.update({"key": key, "label": spec["label"], "issue": spec["issue"], "rss_budget_bytes": spec["budget"],
                "rss_pass": m.peak_rss_bytes <= spec["budget"], "qtool_seconds": report.get("seconds"),
                "sampled_peaks_bytes": m.sampled_peaks_bytes})
    blocks = {}
    for layer in report.get("layers", []):
        st = layer.get("gptq") or {}  # the method's per-layer figures (every calibrated method)
        if "block_seconds" in st:
            blocks[layer["name"].split(".self_attn")[0].split(".mlp")[0]] = st["block_seconds"]
    if blocks:
        row["block_seconds"] = blocks
        if "iters" in spec:
            mean = sum(blocks.values()) / len(blocks)
            row["tuning_s_per_block"] = round(mean, 2)
            row["estimate_full_tuning_s"] = round(mean / spec["iters"] * spec["full_iters"] * len(blocks))
    return row


def markdown(sec: dict) -> str:
    lines = ["## Calibrated methods at ~1 B parameters: peak RSS (random Llama 1.1 B, 128 × 512 calibration)", "",
             f"{sec['date_utc']}, load average at start {sec['load_average_at_start'][0]:.2f}, qtool at {sec['qtool_code_at_start'].get('commit', '')[:7] or '? (not a git checkout)'}. "
             f"`python tests/bench/scale_bench.py`. {sec['model_how']}.", "",
             "| row | issue | quantize wall | peak RSS | budget | per block |",
             "|---|---:|---:|---:|---|---|"]
    for r in sec["rows"]:
        if "error" in r:
            lines.append(f"| {r.get('label', r['key'])} | | failed: {r['error']} | | | |")
            continue
        verdict = f"{'pass' if r['rss_pass'] else '**missed**'} (≤ {r['rss_budget_bytes'] / GIB:.0f} GiB)"
        per_block = ""
        if "tuning_s_per_block" in r:
            spec = ROWS[r["key"]]
            per_block = (f"tuning {r['tuning_s_per_block']:.1f} s per block at {spec['iters']} iterations; {spec['full_iters']} "
                         f"iterations × {len(r['block_seconds'])} blocks ≈ {r['estimate_full_tuning_s'] / 3600:.1f} h of tuning")
        elif r["key"].endswith("-block0"):
            per_block = "one block (whole run, blocks 1..21 passed through)"
        lines.append(f"| {r['label']} | {r['issue']} | {r['wall_s']:.0f} s | {r['peak_rss_bytes'] / GIB:.2f} GiB | {verdict} | {per_block} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out", type=Path, default=run_bench.REPO / "tests/bench/results")
    ap.add_argument("--datasets", type=Path, default=run_bench.REPO.parent / "shared/datasets")
    args = ap.parse_args(argv)
    model = run_bench.cache_dir() / "SmolLM2-135M-Instruct-bf16"
    work = run_bench.cache_dir() / "bench"
    big, how = random_llama_with_tokenizer(work, model)
    work = work / "scale"
    work.mkdir(parents=True, exist_ok=True)
    env = {**run_bench.child_env(), **gb.OMP_POLICY}
    sec = {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "load_average_at_start": os.getloadavg(),
           "qtool_code_at_start": qtool_state(), "model": str(big), "model_how": how, "samples": SAMPLES, "seq_len": SEQ_LEN,
           "machine": run_bench.machine_info(), "rows": []}
    for key in args.rows.split(","):
        t = time.perf_counter()
        try:
            row = measure_row(key, big, args.datasets / run_bench.TEXT_FILE, work, run_bench.qtool_exe(), env)
        except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
            row = {"key": key, "label": ROWS.get(key, {}).get("label", key), "error": gb._err(e)}
        row["stage_s"] = round(time.perf_counter() - t, 1)
        sec["rows"].append(row)
        print(f"[scale bench] {key}: {json.dumps({k: row.get(k) for k in ('wall_s', 'peak_rss_bytes', 'error')})}", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scale.json").write_text(json.dumps(sec, indent=2) + "\n")
        (args.out / "scale.md").write_text(markdown(sec))
    print(markdown(sec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
