"""Learned-rounding section of the qtool bench: qtool's `-m autoround` against AutoRound 0.16.1.

    python tests/bench/autoround_bench.py [--samples 32 --seq-len 512 --iters 50 --settings w4g128,w3g128]
        [--rows autoround,peer] [--qtool-args="--amp" --qtool-args=""]   (one qtool autoround row per --qtool-args)
    (writes tests/bench/results/autoround-SETTINGS.{json,md}; run_bench.py has no autoround option: a run takes hours here)

Protocol (the same for every row and both tools; reduced from the issue's 128 × 512 / 200 iterations
because the machine is a shared 2-core box, the settings are printed with the table):

* Calibration: `--samples` windows of `--seq-len` tokens from the first half of WikiText-2 validation,
  picked by qtool.calib.data.load_calibration with seed 0 (what `qtool quantize --dataset` picks,
  gptq_bench.calibration_windows). AutoRound gets those very token ids as its dataset (a list of
  [1, L] tensors), the same sample count, sequence length, batch size (8) and iteration count;
  lr is left at both tools' default, 1 / iters, with min/max (clipping) tuning on in both.
* Evaluation: `--windows` 512-token windows of the second half, every output scored by the same code
  (gptq_bench.Scoring: the GPTQ folder dequantized by qtool's GPTQ reader into the float32
  transformers model; perplexity, KL(bf16 ‖ model), top-1 agreement).
* Each quantize run is its own measured process (wall time, kernel peak RSS), OMP_WAIT_POLICY=PASSIVE.

Rows per setting: qtool RTN, qtool GPTQ, qtool autoround, AutoRound (peer_autoround.py in the GPTQ venv).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmt  # noqa: E402
import gptq_bench as gb  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PEER_SCRIPT = Path(__file__).with_name("peer_autoround.py")
SETTINGS = {"w4g128": (4, 128), "w3g128": (3, 128), "w4g64": (4, 64), "w2g64": (2, 64)}


def _qtool_row(key: str, label: str, flags: list[str], qtool: str, env: dict, model: Path, text: Path, work: Path,
               samples: int, seq_len: int, scoring: gb.Scoring) -> dict:
    out = work / f"qtool-{key}"
    calib = ["--dataset", str(text), "--samples", str(samples), "--seq-len", str(seq_len)] if "rtn" not in flags else []
    cmd = [qtool, "quantize", str(model), *flags, *calib, "-f", "gptq", "-o", str(out), "--overwrite", "--json"]
    m, row = gb._measured(cmd, env, REPO)
    report = json.loads(m.stdout)
    row.update({"key": key, "label": label, "tool": "qtool", "recipe": " ".join(flags) + " -f gptq",
                "qtool_seconds": report.get("seconds"), "size_bytes": gb.folder_bytes(out), **gb.gptq_bpw(out)})
    row["eval"] = scoring.score_gptq_folder(out)
    return row


def write_calibration(model: Path, text: Path, samples: int, seq_len: int, path: Path):
    """qtool's calibration windows (what `qtool quantize --dataset TEXT` picks), also written to `path`
    as peer_autoround.py's CALIB.json; returns them."""
    calib = gb.calibration_windows(model, text, samples, seq_len)
    path.write_text(json.dumps({"input_ids": calib.input_ids.tolist()}))
    return calib


def run_peer(py: Path, env: dict, model: Path, calib_json: Path, out: Path, result: Path, args: list, work: Path) -> tuple[dict, dict]:
    """peer_autoround.py MODEL CALIB OUT RESULT *args in the GPTQ venv, measured: (measured fields, its RESULT.json)."""
    result.unlink(missing_ok=True)
    peer_env = {**env, "PYTHONNOUSERSITE": "1"}
    peer_env.pop("PYTHONPATH", None)
    _, row = gb._measured([py, PEER_SCRIPT, model, calib_json, out, result, *args], peer_env, work)
    return row, json.loads(result.read_text())


def _peer_row(key: str, bits: int, group: int, iters: int, py: Path, env: dict, model: Path, calib_json: Path, work: Path,
              scoring: gb.Scoring) -> dict:
    out = work / f"autoround-{key}"
    row, peer = run_peer(py, env, model, calib_json, out, work / f"autoround-{key}.json",
                         ["--bits", bits, "--group-size", group, "--iters", iters], work)
    folder = next(p.parent for p in sorted(out.rglob("config.json")))  # AutoRound saves into a sub-folder
    row.update({"key": key, "label": f"AutoRound {bits}-bit g{group}, {iters} iters", "tool": "AutoRound",
                "peer": peer, "size_bytes": gb.folder_bytes(folder), **gb.gptq_bpw(folder)})
    row["eval"] = scoring.score_gptq_folder(folder)
    return row


def run_autoround_section(model: Path, text: Path, work: Path, qtool: str, env: dict, *, samples: int = 32, seq_len: int = 512,
                          iters: int = 50, windows: int = 20, settings: tuple[str, ...] = ("w4g128",), peers: bool = True,
                          rows: tuple[str, ...] = ("rtn", "gptq", "autoround", "peer"), variants: tuple[str, ...] = ("",)) -> dict:
    """`rows`: which of rtn, gptq, autoround, peer to run per setting; `variants`: one qtool autoround row per
    string of extra flags (e.g. "--amp"), labelled with them."""
    from gguf_bench import qtool_state

    from qtool.evaluate import eval_windows, load_tokenizer

    t0 = time.perf_counter()
    work = work / "autoround"
    work.mkdir(parents=True, exist_ok=True)
    env = {**env, **gb.OMP_POLICY}
    calib_json = work / "calibration-ids.json"
    calib = write_calibration(model, text, samples, seq_len, calib_json)
    ev = eval_windows(load_tokenizer(model), text, "eval", gb.EVAL_SEQ_LEN, windows)
    sec: dict = {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "load_average_at_start": os.getloadavg(),
                 "qtool_code_at_start": qtool_state(), "rows": [],
                 "config": {"samples": int(calib.input_ids.shape[0]), "seq_len": int(calib.input_ids.shape[1]), "iters": iters,
                            "batch_size": 8, "calib_ids_sha256": gb.ids_sha256(calib.input_ids), "eval_windows": int(ev.shape[0]),
                            "eval_seq_len": gb.EVAL_SEQ_LEN, "settings": list(settings), "rows": list(rows),
                            "qtool_variants": list(variants)}}
    scoring = gb.Scoring(model, ev)

    def stage(name: str, fn) -> dict:
        t = time.perf_counter()
        try:
            row = fn()
        except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
            traceback.print_exc()
            row = {"key": name, "label": name, "error": gb._err(e)}
        row["stage_s"] = round(time.perf_counter() - t, 1)
        sec["rows"].append(row)
        print(f"[autoround bench] {name}: {json.dumps({k: row.get(k) for k in ('wall_s', 'peak_rss_bytes', 'error')})} "
              f"{json.dumps((row.get('eval') or {}).get('perplexity'))}", flush=True)
        return row

    base = stage("bf16", lambda: {"key": "bf16", "label": "bf16 (scored in float32)", "tool": "–", "bpw": 16.0, "eval": scoring.score_base()})
    del base
    py = gb.ensure_gptq_venv() if peers and "peer" in rows else None
    for s in settings:
        bits, group = SETTINGS[s]
        grid = ["-b", str(bits), "-g", str(group)]
        if "rtn" in rows:
            stage(f"rtn-{s}", lambda: _qtool_row(f"rtn-{s}", f"RTN {bits}-bit g{group}", ["-m", "rtn", *grid], qtool, env, model,
                                                 text, work, samples, seq_len, scoring))
        if "gptq" in rows:
            stage(f"gptq-{s}", lambda: _qtool_row(f"gptq-{s}", f"GPTQ {bits}-bit g{group}", ["-m", "gptq", *grid], qtool, env,
                                                  model, text, work, samples, seq_len, scoring))
        for extra in variants if "autoround" in rows else ():
            flags = extra.split()
            key = f"autoround{variant_tag(flags)}-{s}"
            label = f"autoround {bits}-bit g{group}, {iters} iters" + (f" ({' '.join(flags)})" if flags else "")
            stage(key, lambda: _qtool_row(key, label, ["-m", "autoround", "--iters", str(iters), *grid, *flags], qtool, env,
                                          model, text, work, samples, seq_len, scoring))
        if py is not None:
            stage(f"peer-{s}", lambda: _peer_row(s, bits, group, iters, py, env, model, calib_json, work, scoring))
    sec["seconds"] = round(time.perf_counter() - t0, 1)
    sec["qtool_code_changed_during_run"] = qtool_state() != sec["qtool_code_at_start"]
    return sec


def variant_tag(flags: list[str]) -> str:
    """A row-key suffix for extra qtool flags, with no '-' in it (keys are ROW-SETTING): ['--amp'] -> '+amp'."""
    return "".join("+" + f.lstrip("-").replace("-", "_").replace("=", "_") for f in flags)


def markdown(sec: dict) -> str:
    cfg = sec.get("config", {})
    rows = sec.get("rows", [])
    base_ppl = next(((r.get("eval") or {}).get("perplexity") for r in rows if r.get("key") == "bf16"), None)
    lines = ["## Learned rounding: qtool -m autoround vs AutoRound 0.16.1", "",
             f"{sec.get('date_utc', '')}: one run, {sec.get('seconds', 0):.0f} s (load average at start "
             f"{sec.get('load_average_at_start', [0])[0]:.2f}). SmolLM2-135M-Instruct; **reduced settings** (shared 2-core box): "
             f"{cfg.get('samples')} × {cfg.get('seq_len')} calibration windows (WikiText-2 validation first half, qtool's seeded "
             f"windows, ids sha256 {str(cfg.get('calib_ids_sha256'))[:12]}, the same ids for AutoRound), {cfg.get('iters')} iterations "
             f"for both tools, batch 8, lr 1/iters; symmetric (qtool at its defaults: the full-range signed grid and each block tuned "
             "toward the float model's own hidden states, as AutoRound does). Scored on "
             f"{cfg.get('eval_windows')} × {cfg.get('eval_seq_len')} "
             "tokens of the second half by one code (GPTQ folder → qtool's reader → float32 transformers).", "",
             *([f"{gb.cpu_line(m)}; AutoRound tunes in bf16 autocast only where the CPU has AVX512_BF16, else in float32 like qtool.", ""] if (m := sec.get("machine")) else []),
             "| recipe | tool | quantize wall | peak RSS | bpw | perplexity | ppl / bf16 | KLD | top-1 | time / AutoRound | ppl / AutoRound |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    peers = {r["key"].removeprefix("peer-"): r for r in rows if r.get("tool") == "AutoRound" or str(r.get("key", "")).startswith("peer-")}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('label')} | | not run: {r['error']} | | | | | | | | |")
            continue
        c = gb._cells(r, base_ppl)
        t_ratio = p_ratio = ""
        setting = str(r.get("key", "")).split("-", 1)[-1]
        peer = peers.get(setting)
        if r.get("key", "").startswith("autoround") and peer and "error" not in peer:
            t_ratio = f"**{r['wall_s'] / peer['wall_s']:.2f}×**"
            p_ratio = f"**{r['eval']['perplexity'] / peer['eval']['perplexity']:.4f}**"
        lines.append(f"| {r.get('label')} | {r.get('tool')} | {c[0]} | {c[1]} | {c[3]} | {c[4]} | {c[5]} | {c[6]} | {c[7]} | {t_ratio} | {p_ratio} |")
    lines += ["", "Goals (issue 10): ppl ≤ AutoRound's, wall time ≤ 0.5× AutoRound's; the ratio columns say whether they are met. "
              "Wall time is each tool's whole process (load, calibrate, tune, save)."]
    if sec.get("qtool_code_changed_during_run"):
        lines.append("**qtool's code changed while this section ran.**")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from run_bench import TEXT_FILE, cache_dir, child_env, machine_info, qtool_exe

    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--settings", default="w4g128", help=f"comma-separated, of {', '.join(SETTINGS)}")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--rows", default="rtn,gptq,autoround,peer", help="comma-separated, of rtn, gptq, autoround, peer")
    ap.add_argument("--qtool-args", action="append", help="extra flags of one qtool autoround row (repeatable; default: none)")
    ap.add_argument("--stem", help="output file stem (default autoround-SETTINGS)")
    ap.add_argument("--out", type=Path, default=REPO / "tests/bench/results")
    ap.add_argument("--datasets", type=Path, default=REPO.parent / "shared/datasets")
    args = ap.parse_args(argv)
    model = cache_dir() / "SmolLM2-135M-Instruct-bf16"
    sec = run_autoround_section(model, args.datasets / TEXT_FILE, cache_dir() / "bench", qtool_exe(), child_env(),
                                samples=args.samples, seq_len=args.seq_len, iters=args.iters, windows=args.windows,
                                settings=tuple(args.settings.split(",")), peers=not args.no_peer,
                                rows=tuple(args.rows.split(",")), variants=tuple(args.qtool_args or [""]))
    sec["machine"] = machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or "autoround-" + args.settings.replace(",", "-")
    (args.out / f"{stem}.json").write_text(json.dumps(sec, indent=2, default=str) + "\n")
    md = markdown(sec)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
