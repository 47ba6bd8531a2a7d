"""On-the-fly section of the qtool bench: qtool's files for the on-the-fly runtimes against the peer
libraries quantizing SmolLM2 themselves, on one machine in one run.

    python tests/bench/run_bench.py --otf-only      (this section alone: otf.json, merged into results.json)

Per method at its common settings (CASES): qtool writes the file (`qtool quantize`, measured alone
by measure.py: wall time and peak RSS of the whole process, imports included); the file is loaded
by its real consumer (stock transformers + bitsandbytes / torchao, hqq's AutoHQQHFModel,
optimum-quanto's QuantizedModelForCausalLM) and scored; the peer library quantizes the same bf16
folder itself and saves with its own serializer (import + quantize + save time, peak RSS), then is
scored. Both sides run in the same isolated venv (otf-venv for bitsandbytes / torchao / FP8,
hqq-quanto-quark-venv for hqq / quanto), each job in its own process (otf_score.py), on the same
held-out windows (qtool.evaluate.eval_windows: non-overlapping windows of the second half of
WikiText-2 validation, saved once to a .pt file) with the same scoring code
(qtool.evaluate.perplexity), all in bfloat16.

Size = bytes of the weight files (*.safetensors, *.pt); file bpw = 8 x size / all parameters of the
model (embeddings included, so both sides share one denominator); qtool's bpw of its quantized
linears comes from its report. Goals (issue 11): qtool's perplexity no worse than the peer's
(ratio <= 1 + PPL_TOL) and its time no worse (qtool's process wall <= the peer's import + quantize
+ save); the table says when one is missed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmt  # noqa: E402
import gguf_bench as gb  # noqa: E402
from measure import run_measured  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SCORER = Path(__file__).with_name("otf_score.py")
OTF, HQQ = "otf-venv", "hqq-quanto-quark-venv"
PPL_TOL = 0.001  # perplexity ratio above 1.001: goal missed
DEFAULT_WINDOWS = 8  # x 512 tokens: ~26 processes, each importing a runtime, on a shared 2-core machine
# id: (venv, qtool flags, consumer kind of qtool's file)
CASES = {  # in the order run: the most used settings first (a bounded run keeps them)
    "bnb-nf4": (OTF, ["-f", "bitsandbytes", "--qtype", "nf4", "-g", "64"], "hf"),
    "ao-int4-g128": (OTF, ["-f", "torchao", "--qtype", "int4", "-g", "128"], "hf"),
    "hqq-4-g64": (HQQ, ["-m", "hqq", "-b", "4", "-g", "64", "-f", "hqq"], "hqq"),
    "quanto-int4": (HQQ, ["-f", "quanto", "--qtype", "int4", "-g", "128"], "quanto"),
    "bnb-int8": (OTF, ["-f", "bitsandbytes", "--qtype", "int8"], "hf"),
    "ao-int8": (OTF, ["-f", "torchao", "--qtype", "int8"], "hf"),
    "bnb-nf4-dq": (OTF, ["-f", "bitsandbytes", "--qtype", "nf4", "-g", "64", "--double-quant"], "hf"),
    "bnb-fp4": (OTF, ["-f", "bitsandbytes", "--qtype", "fp4", "-g", "64"], "hf"),
    "ao-fp8": (OTF, ["-f", "torchao", "--qtype", "fp8"], "hf"),
    "quanto-int8": (HQQ, ["-f", "quanto", "--qtype", "int8", "-g", "channel"], "quanto"),
    "ao-int4-g32": (OTF, ["-f", "torchao", "--qtype", "int4", "-g", "32"], "hf"),
    "ao-int4-g64": (OTF, ["-f", "torchao", "--qtype", "int4", "-g", "64"], "hf"),
    "fp8": (OTF, ["-f", "fp8"], "hf"),
    # not in the default run: hqq's own optimizer takes minutes per model on 2 cores
    "hqq-3-g64": (HQQ, ["-m", "hqq", "-b", "3", "-g", "64", "-f", "hqq"], "hqq"),
    "hqq-2-g64": (HQQ, ["-m", "hqq", "-b", "2", "-g", "64", "-f", "hqq"], "hqq"),
}
DEFAULT_CASES = [c for c in CASES if not c.startswith(("hqq-3", "hqq-2"))]
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin")


def weight_bytes(folder: Path) -> int | None:
    if not folder.is_dir():
        return None
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES) or None


def venv_python(venv: str) -> Path:
    return Path(os.environ.get("QTOOL_CACHE", REPO / ".cache")) / venv / "bin" / "python"


def score_job(venv: str, job: str, windows: Path, out: Path, batch_size: int) -> dict:
    """otf_score.py JOB in `venv`'s python, the repository on PYTHONPATH (qtool.evaluate)."""
    py = venv_python(venv)
    if not py.exists():
        return {"error": f"{py} missing: `make {venv}` builds it"}
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out.unlink(missing_ok=True)
    done = subprocess.run([str(py), str(SCORER), str(out), str(windows), job, "--batch-size", str(batch_size)],
                          env=env, capture_output=True, text=True)
    if not out.is_file():
        tail = [l for l in (done.stderr or done.stdout).splitlines() if l.strip()]
        return {"error": f"scorer exited {done.returncode}: {tail[-1] if tail else ''}"[:400]}
    return json.loads(out.read_text())


def qtool_file(qtool: str, env: dict, model: Path, flags: list[str], out: Path) -> dict:
    cmd = [str(c) for c in (qtool, "quantize", model, *flags, "-o", out, "--overwrite", "--json")]
    m = run_measured(cmd, env=env, cwd=REPO)
    if m.returncode != 0:
        lines = [l for l in (m.stderr or m.stdout).splitlines() if l.strip()]
        return {"command": m.cmd, "error": f"qtool exited {m.returncode}: {lines[-1] if lines else ''}"[:400], "wall_s": round(m.wall_s, 2)}
    rep = json.loads(m.stdout)
    return {"command": m.cmd, "wall_s": round(m.wall_s, 2), "peak_rss_bytes": m.peak_rss_bytes, "qtool_seconds": rep.get("seconds"),
            "bpw_quantized": rep.get("bpw_quantized"), "params_total": rep.get("params_total"), "size_bytes": weight_bytes(out)}


def run_case(case: str, model: Path, work: Path, windows: Path, qtool: str, env: dict, batch_size: int) -> dict:
    venv, flags, kind = CASES[case]
    row: dict = {"case": case, "venv": venv, "qtool_flags": flags}
    q_out, p_out = work / f"qtool-{case}", work / f"peer-{case}"
    for d in (q_out, p_out):
        shutil.rmtree(d, ignore_errors=True)
    row["qtool"] = qtool_file(qtool, env, model, flags, q_out)
    if "error" not in row["qtool"]:
        row["qtool"]["eval"] = score_job(venv, f"file:{kind}:{q_out}", windows, work / f"score-qtool-{case}.json", batch_size)
    peer = score_job(venv, f"peer:{case}:{model}:{p_out}", windows, work / f"score-peer-{case}.json", batch_size)
    peer["size_bytes"] = weight_bytes(p_out)
    row["peer"] = peer
    q_ppl = row["qtool"].get("eval", {}).get("perplexity")
    p_ppl = peer.get("perplexity")
    if q_ppl and p_ppl:
        row["ppl_ratio"] = round(q_ppl / p_ppl, 5)
        row["ppl_goal_met"] = row["ppl_ratio"] <= 1 + PPL_TOL
    if "error" not in row["qtool"] and peer.get("total_s"):
        row["time_ratio"] = round(row["qtool"]["wall_s"] / peer["total_s"], 3)
        row["time_goal_met"] = row["time_ratio"] <= 1.0
    for d in (q_out, p_out):
        shutil.rmtree(d, ignore_errors=True)
    return row


def run_otf_section(model: Path, text: Path, work: Path, qtool: str, env: dict, windows: int = DEFAULT_WINDOWS, seq_len: int = 512,
                    batch_size: int = 4, cases: list[str] | None = None, partial: Path | None = None) -> dict:
    """Every case (see the module doc); never raises. `partial`: a JSON file rewritten after each case."""
    import torch

    from qtool.evaluate import eval_windows
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    work = work / "otf-bench"
    work.mkdir(parents=True, exist_ok=True)
    w = eval_windows(AutoTokenizer.from_pretrained(model), text, "eval", seq_len, windows)
    wpath = work / "eval-windows.pt"
    torch.save(w, wpath)
    sec: dict = {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "load_average_at_start": os.getloadavg(),
                 "qtool_code_at_start": gb.qtool_state(), "config": {"model": str(model), "text": str(text), "windows": int(w.shape[0]),
                 "seq_len": seq_len, "batch_size": batch_size, "dtype": "bfloat16", "ppl_tolerance": PPL_TOL}, "rows": []}
    sec["base"] = score_job(OTF, f"base:{model}", wpath, work / "score-base.json", batch_size)
    for case in cases or DEFAULT_CASES:
        print(f"[otf bench] {case} ...", file=sys.stderr, flush=True)
        try:
            sec["rows"].append(run_case(case, model, work, wpath, qtool, env, batch_size))
        except Exception as e:  # noqa: BLE001
            sec["rows"].append({"case": case, "error": gb._err(e)})
        r = sec["rows"][-1]
        print(f"[otf bench] {case}: qtool {r.get('qtool', {}).get('eval', {}).get('perplexity', r.get('qtool', {}).get('error'))} "
              f"peer {r.get('peer', {}).get('perplexity', r.get('peer', {}).get('error'))}", file=sys.stderr, flush=True)
        sec["seconds"] = round(time.perf_counter() - t0, 1)
        if partial:
            partial.write_text(json.dumps(sec, indent=2, default=str) + "\n")
    sec["qtool_code_at_end"] = gb.qtool_state()
    sec["qtool_code_changed_during_run"] = sec["qtool_code_at_end"] != sec["qtool_code_at_start"]
    return sec


# -- markdown --------------------------------------------------------------------------------------
def _ppl(d: dict) -> str:
    return f"{d['perplexity']:.3f}" if d.get("perplexity") else "–"


def _goal(row: dict, key: str) -> str:
    if key not in row:
        return "–"
    return "met" if row[key] else "**missed**"


def markdown(sec: dict) -> str:
    cfg = sec.get("config", {})
    base = sec.get("base", {})
    params = next((r["qtool"].get("params_total") for r in sec.get("rows", []) if r.get("qtool", {}).get("params_total")), None)
    code = sec.get("qtool_code_at_start", {})
    lines = ["## On-the-fly formats: qtool's files vs the peer libraries quantizing themselves (SmolLM2-135M-Instruct)", "",
             f"{sec.get('date_utc', '')}: one run, {sec.get('seconds', 0):.0f} s (load average at its start "
             f"{sec.get('load_average_at_start', [0])[0]:.2f}); qtool at {code.get('commit', '')[:8]}"
             + (" (**its code changed during the run**)" if sec.get("qtool_code_changed_during_run") else "") + ". "
             f"Perplexity: {cfg.get('windows')} × {cfg.get('seq_len')} held-out tokens (second half of WikiText-2 validation), "
             "qtool.evaluate.perplexity, bfloat16, run inside the consumer's isolated venv for both sides. "
             f"bf16 baseline: {_ppl(base)}.", "",
             "| method | peer setting | qtool time | peer time | time ratio | qtool size | peer size | qtool bpw (file / linears) "
             "| peer bpw (file) | qtool PPL | peer PPL | PPL ratio | PPL goal | time goal |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    notes = []
    for r in sec.get("rows", []):
        if "error" in r:
            lines.append(f"| {r['case']} | not run: {r['error']} |" + " |" * 12)
            continue
        q, p = r["qtool"], r["peer"]
        qe = q.get("eval", {})
        qbpw = f"{8 * q['size_bytes'] / params:.2f} / {q['bpw_quantized']:.2f}" if q.get("size_bytes") and params else "–"
        pbpw = f"{8 * p['size_bytes'] / params:.2f}" if p.get("size_bytes") and params else "–"
        q_ppl = _ppl(qe) if "error" not in qe else "error"
        p_ppl = _ppl(p) if "error" not in p else "error"
        cells = [r["case"], p.get("peer", ""), fmt.seconds(q.get("wall_s")), fmt.seconds(p.get("total_s")),
                 f"{r['time_ratio']:.2f}×" if "time_ratio" in r else "–", fmt.size(q.get("size_bytes")), fmt.size(p.get("size_bytes")),
                 qbpw, pbpw, q_ppl, p_ppl, f"{r['ppl_ratio']:.4f}" if "ppl_ratio" in r else "–",
                 _goal(r, "ppl_goal_met"), _goal(r, "time_goal_met")]
        lines.append("| " + " | ".join(cells) + " |")
        for side, d in (("qtool", q), ("qtool's file in its consumer", qe), ("peer", p)):
            if d.get("error"):
                notes.append(f"{r['case']}: {side}: {d['error']}")
        if p.get("save_error"):
            notes.append(f"{r['case']}: the peer could not save its model ({p['save_error']}); no peer size")
        if "time_ratio" in r:
            notes.append(f"{r['case']}: peer time = imports {p['import_s']:.1f} s + quantize {p['quantize_s']:.1f} s + save {p['save_s']:.1f} s; "
                         f"qtool's own quantize time (its report, imports excluded) {q.get('qtool_seconds') or 0:.1f} s; peak RSS qtool "
                         f"{fmt.size(q.get('peak_rss_bytes'))}, peer {fmt.size(p.get('peak_rss_bytes'))}; kernels: file {qe.get('modules')}, peer {p.get('modules')}.")
    missed = []
    for r in sec.get("rows", []):
        what = [k for k, key in (("PPL", "ppl_goal_met"), ("time", "time_goal_met")) if r.get(key) is False]
        if what:
            missed.append(f"{r['case']} ({', '.join(what)})")
    notes.insert(0, "Goals missed: " + (", ".join(missed) or "none")
                 + f". PPL goal: qtool PPL ≤ peer PPL × {1 + PPL_TOL}; time goal: qtool's `quantize` process wall ≤ the peer's imports + "
                 "quantize + save. Wall clock on a shared 2-core machine (other jobs' load differs between the two sides' runs). "
                 "quanto rows: both sides scored with quanto's own dequantized weights in dense Linears (its CPU int4 matmul is too slow); "
                 "file bpw = 8 × weight-file bytes / all parameters (embeddings included).")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # a quick look at a saved section: python otf_bench.py otf.json
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
