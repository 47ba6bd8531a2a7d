"""AQLM section: SmolLM2-135M at ~2 bits per weight. AQLM 1x16 and 2x8 against GPTQ W2 g64 and learned
rounding (autoround) W2 g64, each a `qtool quantize ... --eval --json` run on the same calibration
windows and the same held-out windows (the second half of the text file), measured from a fresh
process (peak RSS, wall time). Reported: held-out perplexity, bits per weight over the quantized
layers (AQLM's codebooks and scales counted), wall time, seconds per decoder block (to size a 7B run:
multiply by its blocks and by the ratio of its layer sizes; the code search grows with out x in x 2^B),
peak RSS. Goal (issue 14): AQLM's perplexity below every uniform 2-bit row at no more bits per weight;
the table says whether it was met.

usage: python tests/bench/aqlm_bench.py [--out DIR] [--samples N] [--seq-len L] [--windows W]
       [--only 2x8,gptq,...] [--aqlm-steps S]
Also run by run_bench.py with --aqlm (optional: a full run takes hours on a 2-core CPU; 1x16 most).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from measure import run_measured  # noqa: E402

TEXT = "wikitext2-valid.txt"
BLOCKS = 30  # SmolLM2-135M decoder blocks


def configs(aqlm_steps: int) -> dict[str, list[str]]:
    a = ["-m", "aqlm", "-f", "aqlm", "--steps", str(aqlm_steps)]
    return {
        "aqlm-2x8": [*a, "--codebooks", "2", "--codebook-bits", "8"],
        "aqlm-1x16": [*a, "--codebooks", "1", "--codebook-bits", "16", "--kmeans-iters", "3"],
        "gptq-w2g64": ["-m", "gptq", "-b", "2", "-g", "64", "-f", "gptq"],
        "autoround-w2g64": ["-m", "autoround", "-b", "2", "-g", "64", "-f", "auto-round"],
    }


def run_section(model: Path, text: Path, work: Path, *, samples: int, seq_len: int, windows: int,
                only: list[str] | None = None, aqlm_steps: int = 2) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    rows = {}
    for name, args in configs(aqlm_steps).items():
        if only and name not in only:
            continue
        cmd = [sys.executable, "-m", "qtool", "quantize", str(model), *args, "--dataset", str(text), "--samples", str(samples),
               "--seq-len", str(seq_len), "--eval", "--eval-windows", str(windows), "--eval-seq-len", str(seq_len),
               "-o", str(work / name), "--overwrite", "--json"]
        m = run_measured(cmd, env=env)
        row = {"cmd": " ".join(map(str, cmd[2:])), "returncode": m.returncode, "wall_s": round(m.wall_s, 1),
               "s_per_block": round(m.wall_s / BLOCKS, 1), "peak_rss_mib": round(m.peak_rss_bytes / 2**20)}
        if m.returncode == 0:
            rep = json.loads(m.stdout[m.stdout.index("{"):])
            ev = rep.get("eval") or {}
            row.update(bpw=rep.get("bpw_quantized"), ppl=(ev.get("candidate") or ev).get("perplexity"),
                       ppl_base=(ev.get("base") or {}).get("perplexity"), eval=ev)
        else:
            row["error"] = m.stderr[-500:]
        rows[name] = row
        print(json.dumps({name: {k: v for k, v in row.items() if k != "eval"}}), flush=True)
    uniform = [r for n, r in rows.items() if not n.startswith("aqlm") and r.get("ppl")]
    for n, r in rows.items():
        if n.startswith("aqlm") and r.get("ppl") and uniform:
            r["goal_met"] = all(r["ppl"] < u["ppl"] and r["bpw"] <= u["bpw"] for u in uniform)
    return {"settings": {"samples": samples, "seq_len": seq_len, "windows": windows, "aqlm_steps": aqlm_steps}, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "aqlm")
    ap.add_argument("--model", type=Path, default=Path(os.environ.get("QTOOL_CACHE", REPO / ".cache")) / "SmolLM2-135M-Instruct-bf16")
    ap.add_argument("--datasets", type=Path, default=REPO.parent / "shared/datasets")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--aqlm-steps", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated rows: aqlm-2x8, aqlm-1x16, gptq-w2g64, autoround-w2g64")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    res = run_section(a.model, a.datasets / TEXT, a.out / "work", samples=a.samples, seq_len=a.seq_len, windows=a.windows,
                      only=[x for x in a.only.split(",") if x], aqlm_steps=a.aqlm_steps)
    (a.out / "aqlm.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
