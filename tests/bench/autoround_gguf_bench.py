"""GGUF section of the learned-rounding bench (issue 10): qtool's `-m autoround -f gguf` file against
AutoRound 0.16.1's `gguf:*` export and llama.cpp's `llama-quantize` (with and without an importance
matrix), every file scored by `llama-perplexity`.

    python tests/bench/autoround_gguf_bench.py [--samples 32 --seq-len 512 --iters 50 --chunks 20 --types Q4_K_M,Q4_0]
    (`make bench-autoround-gguf`; writes tests/bench/results/autoround-gguf.{json,md}; about an hour on 2 cores)

Protocol (SmolLM2-135M-Instruct, llama.cpp = the build cached by tests/llama_cpp_tools.py):

* Calibration: `--samples` windows of `--seq-len` tokens of the first half of WikiText-2 validation,
  picked by qtool's loader with seed 0 (autoround_bench.write_calibration). qtool reads the text file
  (`--dataset`) and picks those windows itself; AutoRound gets the very token ids (peer_autoround.py
  `--format gguf:<type>` in the GPTQ venv, `make autoround-venv`), the same iteration count, batch 8
  (or --samples when smaller).
  llama-imatrix reads the first half as text, `-c SEQ_LEN --chunks SAMPLES` (as many tokens, but
  consecutive chunks from the start: llama.cpp has no seeded window picking).
* Scoring: `llama-perplexity -c 512 --chunks N -t 2` on the second half (gguf_bench.perplexity).
  Baseline: llama.cpp's bf16 GGUF (convert_hf_to_gguf.py), which the llama-quantize rows quantize.
* Wall time: each command's whole process under measure.py (qtool and AutoRound start from the HF
  folder: load, calibrate, tune, write; llama-quantize from the bf16 GGUF, whose conversion is the
  baseline row's time; the imatrix row is llama-imatrix + llama-quantize).

Rows per type: llama-quantize; llama-quantize --imatrix; qtool RTN (`-f gguf -t TYPE`, the control:
byte-identical to llama-quantize); qtool autoround; AutoRound's export (types it exports only).
Goal (issue 10): qtool autoround's perplexity <= AutoRound's, at <= its file size.
A step that cannot run leaves its error in its row.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import autoround_bench as arb  # noqa: E402
import fmt  # noqa: E402
import gguf_bench as ggb  # noqa: E402
import gptq_bench as gb  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ROWS = ("llama", "llama-imatrix", "qtool-rtn", "qtool-autoround", "autoround")
# auto_round 0.16.1's GGUF presets (auto_round/schemes.py GGUF_PRESET_ALIASES), in llama.cpp's spelling
AUTOROUND_GGUF = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
                            "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0"})


def _once(fn):
    """fn() run once; later calls return its value or raise its exception again."""
    box: list = []

    def get():
        if not box:
            try:
                box.append((fn(), None))
            except Exception as e:  # noqa: BLE001 - re-raised to every caller
                box.append((None, e))
        value, err = box[0]
        if err is not None:
            raise err
        return value
    return get


def peer_python(cache: Path) -> Path:
    """The GPTQ venv's python with auto_round, gguf and sentencepiece importable (`make autoround-venv`)."""
    venv = cache / "gptq-venv"
    if not (venv / ".autoround-gguf").is_file():
        done = subprocess.run(["make", "-C", str(REPO), "autoround-venv", f"CACHE={cache}"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"make autoround-venv failed: {(done.stderr.strip() or str(done.returncode)).splitlines()[-1]}")
    py = venv / "bin" / "python"
    check = subprocess.run([py, "-c", "import auto_round, gguf, sentencepiece"], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"{venv}: {check.stderr.strip().splitlines()[-1]} (AutoRound's gguf export needs gguf and sentencepiece)")
    return py


def type_mix(path: Path) -> dict:
    """Tensor count per GGUF type of a file, e.g. {"Q5_0": 166, "Q4_K": 30, ...}."""
    return dict(Counter(t.tensor_type.name for t in ggb.reader(path).tensors).most_common())


def run_section(model: Path, text: Path, work: Path, qtool: str, env: dict, *, samples: int = 32, seq_len: int = 512,
                iters: int = 50, chunks: int = 20, types: tuple[str, ...] = ("Q4_K_M", "Q4_0"), only: tuple[str, ...] = ROWS) -> dict:
    from llama_cpp_tools import ensure_llama_cpp

    from qtool.evaluate import text_part

    t0 = time.perf_counter()
    cache = Path(os.environ.get("QTOOL_CACHE", REPO / ".cache"))
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob("*.gguf"):  # every file scored below is made in this run
        stale.unlink()
    env = {**env, **gb.OMP_POLICY}
    batch = min(8, samples)  # both tools refuse (or shrink to) a batch larger than the sample count
    sec: dict = {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "load_average_at_start": os.getloadavg(),
                 "qtool_code_at_start": ggb.qtool_state(), "rows": [],
                 "config": {"model": str(model), "text": str(text), "samples": samples, "seq_len": seq_len, "iters": iters,
                            "batch_size": batch, "ctx": ggb.CTX, "chunks": chunks, "threads": ggb.THREADS, "types": list(types),
                            "rows": list(only)}}
    try:
        tools = ensure_llama_cpp(cache)
        calib_json = work / "calibration-ids.json"
        calib = arb.write_calibration(model, text, samples, seq_len, calib_json)
        sec["config"]["calib_ids_sha256"] = gb.ids_sha256(calib.input_ids)
        eval_txt, calib_txt = work / "wikitext2-valid.eval.txt", work / "wikitext2-valid.calib.txt"
        eval_txt.write_text(text_part(text, "eval"), encoding="utf-8")
        calib_txt.write_text(text_part(text, "calib"), encoding="utf-8")
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        sec.update(error=ggb._err(e), seconds=round(time.perf_counter() - t0, 1))
        return sec

    bf16 = work / "llama.BF16.gguf"
    convert = _once(lambda: ggb.llama_convert(tools, model, bf16))
    imatrix_file = work / "imatrix.gguf"
    imatrix = _once(lambda: ggb._measure([tools.imatrix, "-m", _bf16(), "-f", calib_txt, "-c", seq_len, "--chunks", samples,
                                          "-t", ggb.THREADS, "--no-ppl", "-o", imatrix_file], dict(os.environ), "llama-imatrix"))
    peer_py = _once(lambda: peer_python(cache))

    def _bf16() -> Path:
        convert()
        return bf16

    def row(key: str, qtype: str, label: str, make) -> dict:
        r: dict = {"key": key, "type": qtype, "label": label}
        t = time.perf_counter()
        try:
            r.update(make())
            out = Path(r["file"])
            r.update({**ggb.gguf_stats(out), "type_mix": type_mix(out), **ggb.perplexity(tools, out, eval_txt, chunks)})
        except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
            traceback.print_exc()
            r["error"] = ggb._err(e)
        ggb.forget_readers()
        r["stage_s"] = round(time.perf_counter() - t, 1)
        sec["rows"].append(r)
        print(f"[autoround-gguf bench] {qtype} {key}: {json.dumps({k: r.get(k) for k in ('wall_s', 'size_bytes', 'ppl', 'error')})}",
              file=sys.stderr, flush=True)
        return r

    row("bf16", "BF16", "llama.cpp convert_hf_to_gguf --outtype bf16 (baseline)", lambda: {**convert(), "file": str(bf16)})
    for qtype in types:
        f = {k: work / f"{k}.{qtype}.gguf" for k in ROWS}
        if "llama" in only:
            row("llama", qtype, "llama-quantize", lambda: {**ggb.llama_quantize(tools, _bf16(), f["llama"], qtype), "file": str(f["llama"])})
        if "llama-imatrix" in only:
            def with_imatrix() -> dict:
                steps = {"llama-imatrix": imatrix(),
                         "llama-quantize --imatrix": ggb.llama_quantize(tools, _bf16(), f["llama-imatrix"], qtype, imatrix_file)}
                return {"steps": steps, "wall_s": round(sum(s["wall_s"] for s in steps.values()), 2),
                        "peak_rss_bytes": max(s["peak_rss_bytes"] for s in steps.values()), "file": str(f["llama-imatrix"])}
            row("llama-imatrix", qtype, f"llama-imatrix ({samples} × {seq_len} tokens) + llama-quantize --imatrix", with_imatrix)
        if "qtool-rtn" in only:
            def rtn() -> dict:
                d = {**ggb.qtool_quantize(qtool, env, model, f["qtool-rtn"], qtype), "file": str(f["qtool-rtn"])}
                if f["llama"].is_file():
                    d["vs_llama_quantize"] = ggb.compare_tensors(f["qtool-rtn"], f["llama"])
                return d
            row("qtool-rtn", qtype, "qtool quantize -f gguf (RTN, control)", rtn)
        if "qtool-autoround" in only:
            cmd = [qtool, "quantize", model, "-m", "autoround", "--iters", iters, "--dataset", text, "--samples", samples,
                   "--seq-len", seq_len, "--batch-size", batch, "-f", "gguf", "-t", qtype, "-o", f["qtool-autoround"], "--overwrite", "--json"]
            row("qtool-autoround", qtype, f"qtool quantize -m autoround --iters {iters} -f gguf",
                lambda: {**ggb._measure(cmd, env, f"qtool -m autoround -t {qtype}"), "file": str(f["qtool-autoround"])})
        if "autoround" in only:
            def peer() -> dict:
                if qtype not in AUTOROUND_GGUF:
                    raise RuntimeError(f"AutoRound 0.16.1 exports no gguf:{qtype.lower()}")
                out = work / f"autoround-{qtype}"
                shutil.rmtree(out, ignore_errors=True)
                m, res = arb.run_peer(peer_py(), env, model, calib_json, out, work / f"autoround-{qtype}.json",
                                      ["--format", f"gguf:{qtype.lower()}", "--iters", iters, "--batch-size", batch], work)
                return {**m, "peer": res, "file": res["gguf_file"]}
            row("autoround", qtype, f"AutoRound 0.16.1 gguf:{qtype.lower()}, {iters} iters", peer)
    sec["goals"] = {qtype: goal(sec["rows"], qtype) for qtype in types}
    sec["seconds"] = round(time.perf_counter() - t0, 1)
    sec["qtool_code_changed_during_run"] = ggb.qtool_state() != sec["qtool_code_at_start"]
    return sec


def goal(rows: list[dict], qtype: str) -> dict:
    """Issue 10's goal for one type: qtool autoround's perplexity <= AutoRound's at <= its size, where size is the
    tensor data (the quantized payload); whole files also differ by metadata (qtool writes its provenance)."""
    q, p = (next((r for r in rows if r["key"] == k and r["type"] == qtype), None) for k in ("qtool-autoround", "autoround"))
    for r, who in ((q, "qtool autoround"), (p, "AutoRound")):
        if r is None:
            return {"status": "not measured", "why": f"{who} row not run"}
        if "error" in r:
            return {"status": "not measured", "why": f"{who} failed"}
    ppl, size = q["ppl"] / p["ppl"], q["tensor_bytes"] / p["tensor_bytes"]
    misses = ([f"ppl {ppl:.4f}× AutoRound's"] if ppl > 1 else []) + ([f"tensor bytes {size:.4f}× AutoRound's"] if size > 1 else [])
    return {"status": "missed" if misses else "met", "ppl_ratio": round(ppl, 4), "tensor_bytes_ratio": round(size, 4),
            "file_size_ratio": round(q["size_bytes"] / p["size_bytes"], 4),
            "why": "; ".join(misses) or f"ppl {ppl:.4f}×, tensor bytes {size:.4f}× AutoRound's"}


def markdown(sec: dict) -> str:
    cfg = sec.get("config", {})
    lines = ["## Learned rounding to GGUF: qtool -m autoround vs AutoRound 0.16.1 and llama-quantize (issue 10)", ""]
    if sec.get("command"):
        lines += [f"`{sec['command']}`", ""]
    if "error" in sec:
        return "\n".join(lines + [f"Not run: {sec['error']}", ""])
    code = sec.get("qtool_code_at_start", {})
    lines += [f"{sec.get('date_utc', '')}: one run, {sec.get('seconds', 0):.0f} s (load average at start "
              f"{sec.get('load_average_at_start', [0])[0]:.2f}), qtool at {code.get('commit', '')[:8]} (uncommitted qtool/ diff "
              f"{code.get('qtool_diff_sha1')}). SmolLM2-135M-Instruct. Calibration: {cfg.get('samples')} × {cfg.get('seq_len')} tokens "
              f"of the first half of WikiText-2 validation (qtool's seeded windows, ids sha256 {str(cfg.get('calib_ids_sha256'))[:12]}, the "
              f"same ids for AutoRound; llama-imatrix: `-c {cfg.get('seq_len')} --chunks {cfg.get('samples')}` on that half, consecutive "
              f"chunks), {cfg.get('iters')} iterations for both learned-rounding tools, batch {cfg.get('batch_size')}, lr 1/iters. Every file scored by "
              f"`llama-perplexity -c {cfg.get('ctx')} --chunks {cfg.get('chunks')} -t {cfg.get('threads')}` on the second half.", ""]
    if m := sec.get("machine"):
        lines += [f"{gb.cpu_line(m)}.", ""]
    n = cfg.get("chunks")
    lines += [f"| type | row | file size | bpw | perplexity (N={n}) | ppl / bf16 | quantize wall | goal: ppl ≤ AutoRound's at ≤ its tensor bytes |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    rows = sec.get("rows", [])
    base = next((r.get("ppl") for r in rows if r["key"] == "bf16"), None)
    goals = sec.get("goals", {})
    for r in rows:
        g = ""
        if r["key"] == "qtool-autoround" and (gl := goals.get(r["type"])):
            g = {"met": "met", "missed": "**missed**"}.get(gl["status"], "not measured") + f" ({gl['why']})"
        if "error" in r:
            lines.append(f"| {r['type']} | {r['label']} | not run: {r['error']} | | | | | {g} |")
            continue
        rel = f"{r['ppl'] / base:.4f}" if base else "–"
        lines.append(f"| {r['type']} | {r['label']} | {fmt.size(r['size_bytes'])} | {r['bpw']:.3f} | {r['ppl']:.3f} ± {r['ppl_err']:.3f} "
                     f"| {rel} | {fmt.seconds(r.get('wall_s'))} | {g} |")
    notes = ["SmolLM2's 576-wide rows are no multiple of the 256-wide K super-block, so llama.cpp's fallback rules apply: "
             "its \"Q4_K_M\" is mostly Q5_0 (166 of 211 matrices), not Q4_K."] if any("_K" in t for t in cfg.get("types", [])) else []
    for qtype in cfg.get("types", []):
        mixes = {r["label"]: json.dumps(r["type_mix"]) for r in rows if r["type"] == qtype and "type_mix" in r}
        for mix in dict.fromkeys(mixes.values()):
            who = "all its rows" if len(set(mixes.values())) == 1 else ", ".join(k for k, v in mixes.items() if v == mix)
            notes.append(f"{qtype} tensors per type ({who}): {', '.join(f'{k} {v}' for k, v in json.loads(mix).items())}.")
    for r in rows:
        if r["key"] == "qtool-rtn" and (c := r.get("vs_llama_quantize")):
            notes.append(f"qtool RTN {r['type']} vs llama-quantize's file: " + ggb._same(c) + ".")
    notes += ["File size is the whole file (tensors, metadata, tokenizer); bpw = 8 × tensor bytes / tensor elements over all tensors. "
              "The goal compares tensor bytes: qtool's files also carry its provenance metadata (qtool.provenance), hence their larger file size at equal tensor bytes.",
              "Wall time is each command's whole process: qtool and AutoRound from the HF folder (load, calibrate, tune, write), "
              "llama-quantize from the bf16 GGUF (its conversion is the baseline row's time); the imatrix row adds llama-imatrix's run."]
    if sec.get("qtool_code_changed_during_run"):
        notes.append("**qtool's code changed while this section ran: its rows may mix two versions.**")
    return "\n".join(lines + [""] + [f"- {x}" for x in notes]) + "\n"


def main(argv: list[str] | None = None) -> int:
    from run_bench import TEXT_FILE, cache_dir, child_env, machine_info, qtool_exe

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--chunks", type=int, default=20, help="llama-perplexity chunks of 512 tokens")
    ap.add_argument("--types", default="Q4_K_M,Q4_0", help="comma-separated llama.cpp types")
    ap.add_argument("--only", default=",".join(ROWS), help=f"comma-separated rows, of {', '.join(ROWS)} (the bf16 baseline always runs)")
    ap.add_argument("--out", type=Path, default=REPO / "tests/bench/results")
    ap.add_argument("--datasets", type=Path, default=REPO.parent / "shared/datasets")
    args = ap.parse_args(argv)
    only = tuple(x.strip() for x in args.only.split(",") if x.strip())
    if bad := [x for x in only if x not in ROWS]:
        ap.error(f"--only: unknown rows {bad}; expected {', '.join(ROWS)}")
    types = tuple(x.strip().upper() for x in args.types.split(",") if x.strip())
    sec = run_section(cache_dir() / "SmolLM2-135M-Instruct-bf16", args.datasets / TEXT_FILE, cache_dir() / "bench" / "autoround-gguf",
                      qtool_exe(), child_env(), samples=args.samples, seq_len=args.seq_len, iters=args.iters, chunks=args.chunks,
                      types=types, only=only)
    sec["machine"] = machine_info()
    sec["command"] = shlex.join(["python", "tests/bench/autoround_gguf_bench.py", *(sys.argv[1:] if argv is None else argv)])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "autoround-gguf.json").write_text(json.dumps(sec, indent=2, default=str) + "\n")
    md = markdown(sec)
    (args.out / "autoround-gguf.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
