"""AWQ / better-GPTQ section of the qtool bench: RTN, GPTQ, GPTQ + group-aware, AWQ against
llm-compressor's AWQ and GPTQModel's defaults, on one machine in one run.

    python tests/bench/run_bench.py --awq-only      (this section alone, merged into results.json)

Protocol (the same for every row and every tool; the GPTQ section's, gptq_bench.py):

* Calibration: `--awq-samples` windows (default 32) of `--awq-seq-len` tokens (default 512) from the
  FIRST half of WikiText-2 validation, picked by qtool.calib.data.load_calibration with seed 0
  (exactly what `qtool quantize --dataset ... --samples N --seq-len L` takes). The token ids go to
  WORK/awq/calibration-ids.json; GPTQModel and llm-compressor calibrate on that file unchanged.
  32 and not 128 windows: llm-compressor's AWQ took ~15 min at 32 on this shared 2-core machine.
* Evaluation: `--awq-windows` (default 20) 512-token windows of the SECOND half. Every output folder
  (qtool's `-f gptq`, GPTQModel's GPTQ, llm-compressor's compressed-tensors) is dequantized by
  qtool's reader (qtool.model.quantized_source.read_dequantized, the reference math; float tensors
  such as AWQ's rescaled norms taken as stored) into SmolLM2's transformers model in float32, and
  qtool.evaluate.compare gives perplexity, KL(bf16 || model) and top-1 agreement vs bf16.
* Each quantize run is its own process measured by measure.py (wall time, kernel peak RSS), with
  OMP_WAIT_POLICY=PASSIVE for every tool (see gptq_bench.OMP_POLICY).

Settings: int4 g64, int4 g128, int3 g128 (qtool's `-f gptq` holds SmolLM2's partial last group,
576 = 4 x 128 + 64). qtool rows per setting: RTN; GPTQ with damp 0.01 and no reordering (qtool's
defaults before this bench); GPTQ + group-aware, damp 0.05 (GPTQModel's default algorithm); the
same + --mse; AWQ (its defaults, asymmetric). Every GPTQ row spells all three parameters, so the
rows do not change meaning when the defaults do; the table marks the row equal to qtool's
defaults at the commit that ran it. Peers: GPTQModel with its own defaults (damp 0.05,
act_group_aware) at each setting; llm-compressor's AWQ at int4 g64 only (its group strategy
refuses g128 on 576-wide inputs).

Peer reuse (`--awq-reuse-peers`): a peer folder + result JSON already under WORK/awq is scored
again instead of re-run when calibration-ids.json there holds the very ids of this run and is
older than the folder (the peer read that file); the row says it was reused, with the wall time
the peer's own run recorded and no peak RSS unless that run measured one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmt  # noqa: E402
from gptq_bench import (OMP_POLICY, Scoring, _err, _measured, calibration_windows, cpu_line, ensure_gptq_venv,  # noqa: E402
                        folder_bytes, gptq_bpw, ids_sha256)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SAMPLES = 32
DEFAULT_SEQ_LEN = 512
DEFAULT_WINDOWS = 20
GPTQMODEL_SCRIPT = Path(__file__).with_name("peer_gptqmodel.py")
LLMC_SCRIPT = Path(__file__).with_name("peer_llmcompressor.py")
SETTINGS = (("w4g128", 4, 128), ("w4g64", 4, 64), ("w3g128", 3, 128))


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    flags: tuple[str, ...]
    gptq: dict | None = None  # the GPTQ parameters the flags set (to find qtool's defaults among rows)


VARIANTS = (
    Variant("rtn", "RTN", ("-m", "rtn")),
    Variant("gptq-d01", "GPTQ damp 0.01", ("-m", "gptq", "--damp", "0.01", "--no-group-aware", "--no-mse"),
            {"damp": 0.01, "group_aware": False, "mse": False}),
    Variant("gptq-ga-d05", "GPTQ group-aware, damp 0.05", ("-m", "gptq", "--damp", "0.05", "--group-aware", "--no-mse"),
            {"damp": 0.05, "group_aware": True, "mse": False}),
    Variant("gptq-ga-mse-d05", "GPTQ group-aware + mse, damp 0.05", ("-m", "gptq", "--damp", "0.05", "--group-aware", "--mse"),
            {"damp": 0.05, "group_aware": True, "mse": True}),
    Variant("gptq-ga-mse-d05-amp", "GPTQ group-aware + mse, damp 0.05, --amp (bf16 forwards)",
            ("-m", "gptq", "--damp", "0.05", "--group-aware", "--mse", "--amp"),
            {"damp": 0.05, "group_aware": True, "mse": True, "amp": True}),
    Variant("gptq-ga-d05-amp", "GPTQ group-aware, damp 0.05, --amp (GPTQModel's defaults: its algorithm, bf16 forwards)",
            ("-m", "gptq", "--damp", "0.05", "--group-aware", "--no-mse", "--amp"),
            {"damp": 0.05, "group_aware": True, "mse": False, "amp": True}),
    Variant("awq", "AWQ (defaults, asymmetric)", ("-m", "awq")),
)


def qtool_gptq_defaults() -> dict:
    from qtool.methods.gptq import GPTQParams

    p = GPTQParams()
    return {"damp": p.damp, "group_aware": p.group_aware, "mse": p.mse}


class _CachedBase:
    """The bf16 scorer with its logits kept per batch: every row compares against the same base
    logits, computed once (20 x 512 x 49152 float32: ~2 GB) instead of once per row."""

    def __init__(self, scorer) -> None:
        self.scorer, self.cache = scorer, {}

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        key = hash(tuple(batch.flatten().tolist()))
        if key not in self.cache:
            self.cache[key] = self.scorer.logits(batch)
        return self.cache[key]


class FolderScoring(Scoring):
    def __init__(self, model: Path, windows) -> None:
        super().__init__(model, windows)
        self.base = _CachedBase(self.base)

    def score_folder(self, folder: Path) -> dict:
        from qtool.model.quantized_source import read_dequantized

        return self.score_state(folder, read_dequantized, "transformers (dequantized by qtool's reader)")


def qtool_row(v: Variant, bits: int, group: int, qtool: str, env: dict, model: Path, text: Path, work: Path,
              samples: int, seq_len: int, scoring: FolderScoring) -> dict:
    out = work / f"qtool-{v.key}-w{bits}g{group}"
    calib = () if v.key == "rtn" else ("--dataset", str(text), "--samples", str(samples), "--seq-len", str(seq_len))
    cmd = [qtool, "quantize", str(model), *v.flags, "-b", str(bits), "-g", str(group), *calib, "-f", "gptq",
           "-o", str(out), "--overwrite", "--json"]
    m, row = _measured(cmd, env, REPO)
    report = json.loads(m.stdout)
    row.update({"tool": "qtool", "qtool_seconds": report.get("seconds"), "size_bytes": folder_bytes(out), **gptq_bpw(out),
                "notes": report.get("notes"), "method_params": (report.get("recipe") or {}).get("method_params")})
    row["eval"] = scoring.score_folder(out)
    return row


def _reusable(work: Path, out: Path, result: Path, calib_json: Path, samples: int, seq_len: int) -> bool:
    if not (out.is_dir() and (out / "config.json").is_file() and result.is_file()):
        return False
    info = json.loads(result.read_text())
    cal = info.get("calibration") or {}
    return (cal.get("samples"), cal.get("seq_len")) == (samples, seq_len) and calib_json.stat().st_mtime < out.stat().st_mtime


def gptqmodel_row(bits: int, group: int, py: Path, env: dict, model: Path, calib_json: Path, work: Path,
                  scoring: FolderScoring) -> dict:
    slug = f"gptqmodel-w{bits}g{group}-defaults"
    out, result = work / slug, work / f"{slug}.json"
    result.unlink(missing_ok=True)
    cmd = [py, GPTQMODEL_SCRIPT, model, calib_json, out, result, "--bits", bits, "--group-size", group, "--no-check"]
    peer_env = {**env, "GPTQMODEL_CPU_WORKERS": "2", "PYTHONNOUSERSITE": "1"}
    peer_env.pop("PYTHONPATH", None)
    _, row = _measured(cmd, peer_env, work)
    info = json.loads(result.read_text())
    row.update({"tool": "GPTQModel", "peer": info, "size_bytes": folder_bytes(out), **gptq_bpw(out)})
    row["eval"] = scoring.score_folder(out)
    return row


def llmc_row(bits: int, group: int, env: dict, model: Path, calib_json: Path, work: Path, scoring: FolderScoring,
             reuse: bool, samples: int, seq_len: int) -> dict:
    cache = Path(os.environ.get("QTOOL_CACHE", REPO / ".cache"))
    py = cache / "llmcompressor-venv" / "bin" / "python"
    slug = f"llmcompressor-awq-w{bits}g{group}"
    out, result = work / slug, work / f"{slug}.json"
    if reuse and _reusable(work, out, result, calib_json, samples, seq_len):
        info = json.loads(result.read_text())
        row = {"reused": dt.datetime.fromtimestamp(out.stat().st_mtime, dt.timezone.utc).isoformat(timespec="minutes"),
               "wall_s": info.get("run_s"), "peak_rss_bytes": info.get("peak_rss_bytes")}
    else:
        if not (cache / "llmcompressor-venv" / ".installed").is_file():
            raise RuntimeError("llm-compressor venv missing: run `make llmcompressor-venv`")
        result.unlink(missing_ok=True)
        cmd = [py, LLMC_SCRIPT, model, calib_json, out, result, "--bits", bits, "--group-size", group]
        peer_env = {**env, "PYTHONNOUSERSITE": "1"}
        peer_env.pop("PYTHONPATH", None)
        _, row = _measured(cmd, peer_env, work)
        info = json.loads(result.read_text())
    row.update({"tool": "llm-compressor", "peer": info, "size_bytes": folder_bytes(out)})
    row["eval"] = scoring.score_folder(out)
    return row


def run_awq_section(model: Path, text: Path, work: Path, qtool: str, env: dict, *, samples: int = DEFAULT_SAMPLES,
                    seq_len: int = DEFAULT_SEQ_LEN, windows: int = DEFAULT_WINDOWS, peers: bool = True,
                    reuse_peers: bool = False, settings: tuple = SETTINGS, variants: tuple = VARIANTS,
                    only: list[str] | None = None, save=None) -> dict:
    """Every row (see the module doc); never raises: a failing part leaves its error. `save(sec)` after
    each row keeps what is done if the run is cut off."""
    from gguf_bench import qtool_state
    from qtool.evaluate import eval_windows, load_tokenizer

    t0 = time.perf_counter()
    work = work / "awq"
    work.mkdir(parents=True, exist_ok=True)
    env = {**env, **OMP_POLICY}
    sec: dict = {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "load_average_at_start": os.getloadavg(), "rows": [], "qtool_code_at_start": qtool_state(),
                 "qtool_gptq_defaults": qtool_gptq_defaults()}
    calib = calibration_windows(model, text, samples, seq_len)
    calib_json = work / "calibration-ids.json"
    payload = {"input_ids": calib.input_ids.tolist()}
    if not calib_json.is_file() or json.loads(calib_json.read_text()) != payload:  # kept (and its mtime) when equal
        calib_json.write_text(json.dumps(payload))
    ev = eval_windows(load_tokenizer(model), text, "eval", 512, windows)
    sec["config"] = {"model": str(model), "text": str(text),
                     "calibration": {"samples": samples, "seq_len": seq_len, "ids_sha256": ids_sha256(calib.input_ids)},
                     "eval": {"windows": int(ev.shape[0]), "seq_len": int(ev.shape[1])}}
    scoring = FolderScoring(model, ev)

    def stage(fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
            traceback.print_exc()
            return {"error": _err(e)}

    def add(row: dict) -> None:  # saved with the row in it, so a run cut off later keeps every finished row
        sec["rows"].append(row)
        sec["seconds"] = round(time.perf_counter() - t0, 1)
        if save:
            save(sec)

    base = stage(scoring.score_base)
    add({"setting": "bf16", "key": "bf16", "label": "bf16 (scored in float32)", "tool": "–",
                        "size_bytes": folder_bytes(model), "bpw": 16.0, "eval": base})
    try:
        gptqmodel_py = ensure_gptq_venv() if peers else None
    except Exception as e:  # noqa: BLE001
        gptqmodel_py, sec["gptqmodel_error"] = None, _err(e)
    plan = [(name, bits, group, v.key) for name, bits, group in settings for v in variants]
    if peers:
        plan = [p for name, bits, group in settings for p in
                [x for x in plan if x[0] == name] + [(name, bits, group, "gptqmodel-defaults")]
                + ([(name, bits, group, "llmcompressor-awq")] if group == 64 else [])]
    if only:  # "setting:key" in the order given
        known = {f"{n}:{k}": (n, b, g, k) for n, b, g, k in plan}
        plan = [known[o] for o in only if o in known]
        sec["rows_asked"] = list(only)
    by_key = {v.key: v for v in variants}
    for name, bits, group, key in plan:
        if key in by_key:
            v = by_key[key]
            row = stage(lambda v=v: qtool_row(v, bits, group, qtool, env, model, text, work, samples, seq_len, scoring))
            add({"setting": name, "key": v.key, "label": v.label, "gptq_params": v.gptq,
                                "recipe": " ".join(v.flags) + f" -b {bits} -g {group} -f gptq", **row})
        elif key == "gptqmodel-defaults":
            if gptqmodel_py is None:
                row = {"error": f"GPTQModel unavailable: {sec.get('gptqmodel_error')}"}
            else:
                row = stage(lambda: gptqmodel_row(bits, group, gptqmodel_py, env, model, calib_json, work, scoring))
            add({"setting": name, "key": key, "label": "GPTQModel defaults (damp 0.05, act_group_aware)", **row})
        else:
            row = stage(lambda: llmc_row(bits, group, env, model, calib_json, work, scoring, reuse_peers, samples, seq_len))
            add({"setting": name, "key": key, "label": "llm-compressor AWQ (duo_scaling, 20-point grid)", **row})
    sec["seconds"] = round(time.perf_counter() - t0, 1)
    sec["qtool_code_at_end"] = qtool_state()
    sec["qtool_code_changed_during_run"] = sec["qtool_code_at_end"] != sec["qtool_code_at_start"]
    return sec


# -- markdown --------------------------------------------------------------------------------------
def _ppl(r: dict) -> float | None:
    return (r.get("eval") or {}).get("perplexity")


def _cells(d: dict, base_ppl: float | None) -> list[str]:
    ev = d.get("eval") or {}
    ppl = ev.get("perplexity")
    return [fmt.seconds(d.get("wall_s")), fmt.size(d.get("peak_rss_bytes")), fmt.size(d.get("size_bytes")),
            f"{d['bpw']:.3f}" if d.get("bpw") else "–",
            f"{ppl:.3f}" if ppl else "–", f"{ppl / base_ppl:.4f}" if ppl and base_ppl else "–",
            f"{ev['kld_mean']:.4f}" if ev.get("kld_mean") is not None else "–",
            f"{100 * ev['top1_agreement']:.2f} %" if ev.get("top1_agreement") is not None else "–"]


def goals(sec: dict) -> list[str]:
    """The issue's goals, each met or MISSED, from the rows (qtool's GPTQ defaults: the row whose
    parameters equal GPTQParams' defaults at the commit that ran the section)."""
    out = []
    dflt = sec.get("qtool_gptq_defaults_chosen") or sec.get("qtool_gptq_defaults")
    by = {}
    for r in sec.get("rows", []):
        by.setdefault(r.get("setting"), {})[r.get("key")] = r
    for setting, rows in by.items():
        if setting == "bf16":
            continue
        ours = next((r for r in rows.values() if r.get("gptq_params") == dflt and "error" not in r), None)
        peer = rows.get("gptqmodel-defaults")
        if ours is not None and peer is not None and _ppl(ours) and _ppl(peer):
            q_ok = _ppl(ours) <= _ppl(peer)
            t_ok = ours["wall_s"] <= peer["wall_s"]
            out.append(f"{setting}: qtool GPTQ defaults ({ours['label']}) perplexity {_ppl(ours):.3f} vs GPTQModel defaults "
                       f"{_ppl(peer):.3f}: {'met' if q_ok else '**MISSED**'}; wall {ours['wall_s']:.0f} s vs {peer['wall_s']:.0f} s: "
                       f"{'met' if t_ok else '**MISSED**'}.")
        elif peer is not None:
            out.append(f"{setting}: qtool GPTQ defaults vs GPTQModel defaults: not compared "
                       f"({'no qtool row with the current defaults' if ours is None else 'a row failed'}).")
        awq, llmc = rows.get("awq"), rows.get("llmcompressor-awq")
        if awq is not None and llmc is not None and _ppl(awq) and _ppl(llmc):
            q_ok = _ppl(awq) <= _ppl(llmc)
            t_ok = llmc.get("wall_s") is not None and awq["wall_s"] <= llmc["wall_s"]
            out.append(f"{setting}: qtool AWQ perplexity {_ppl(awq):.3f} vs llm-compressor AWQ {_ppl(llmc):.3f}: "
                       f"{'met' if q_ok else '**MISSED**'}; wall {awq['wall_s']:.0f} s vs {fmt.seconds(llmc.get('wall_s'))}: "
                       f"{'met' if t_ok else '**MISSED**'}.")
    return out


def markdown(sec: dict) -> str:
    lines = ["## AWQ and GPTQ defaults vs llm-compressor and GPTQModel", ""]
    if "error" in sec:
        return "\n".join(lines + [f"Not run: {sec['error']}", ""])
    cfg = sec.get("config", {})
    cal, ev = cfg.get("calibration", {}), cfg.get("eval", {})
    base = next((r for r in sec["rows"] if r.get("key") == "bf16"), {})
    base_ppl = _ppl(base)
    code = sec.get("qtool_code_at_start", {})
    dflt = sec.get("qtool_gptq_defaults_chosen") or sec.get("qtool_gptq_defaults") or {}
    if code:
        lines += [f"qtool at {code.get('commit', '')[:8]} (uncommitted qtool/ diff {code.get('qtool_diff_sha1')})."
                  + (" **qtool's code changed while this section ran: its rows may mix two versions.**"
                     if sec.get("qtool_code_changed_during_run") else ""), ""]
    lines += [
        f"{sec.get('date_utc', '')}: one run, {sec.get('seconds', 0):.0f} s for the section (load average at its start "
        f"{sec.get('load_average_at_start', [0])[0]:.2f}; a machine shared with other jobs, so wall times carry noise).",
        "",
    ]
    m = sec.get("machine")
    if m:
        lines += [f"{cpu_line(m)}. Time ratios hold for this CPU only: GPTQModel runs its forwards in bf16, fast only where the CPU has bf16 "
                  "instructions (AVX512_BF16/AMX); qtool in float32.", ""]
    lines += [
        f"SmolLM2-135M-Instruct (bf16). Calibration, the same token windows for every run of every tool: {cal.get('samples')} × "
        f"{cal.get('seq_len')} tokens from the first half of WikiText-2 validation (token ids sha256 {str(cal.get('ids_sha256'))[:12]}). "
        f"Scored on {ev.get('windows')} × {ev.get('seq_len')} tokens of the second half, every output folder dequantized by qtool's "
        "reader into the transformers model in float32; KLD = mean KL(bf16 ‖ model) per token, top-1 = argmax agreement with bf16. "
        "Wall time and peak RSS: the whole quantize run of each tool as its own process (kernel ru_maxrss). bpw: 8 × bytes of "
        "qweight+qzeros+scales+g_idx / quantized weights (GPTQ folders).",
        "",
        (f"qtool's GPTQ defaults, chosen from these rows after the run (the run's code still had damp "
         f"{sec['qtool_gptq_defaults'].get('damp')}, group_aware {sec['qtool_gptq_defaults'].get('group_aware')}, mse "
         f"{sec['qtool_gptq_defaults'].get('mse')}; every GPTQ row spells all three, so none depends on the defaults): "
         if sec.get("qtool_gptq_defaults_chosen") else "qtool's GPTQ defaults at this commit: ")
        + f"damp {dflt.get('damp')}, group_aware {dflt.get('group_aware')}, mse {dflt.get('mse')} (the rows marked ★).",
        "",
        "| setting | row | tool | quantize wall | peak RSS | size | bpw | perplexity | ppl / bf16 | KLD | top-1 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sec["rows"]:
        label = r.get("label", "") + (" ★" if r.get("gptq_params") and r.get("gptq_params") == dflt else "")
        if r.get("reused"):
            label += f" (folder of an earlier run, {r['reused']}, re-scored; wall time as that run recorded it)"
        if "error" in r:
            lines.append(f"| {r.get('setting')} | {label} | {r.get('tool', '')} | not run: {r['error']} | | | | | | | |")
        else:
            lines.append(f"| {r.get('setting')} | {label} | {r.get('tool', '')} | {' | '.join(_cells(r, base_ppl))} |")
    if sec.get("rows_asked"):
        done = {f"{r.get('setting')}:{r.get('key')}" for r in sec["rows"]}
        missing = [o for o in sec["rows_asked"] if o not in done]
        lines += ["", f"Rows asked (`--awq-rows`, in this order): {', '.join(sec['rows_asked'])}. "
                  + (f"**Not run** ({sec.get('stopped_because') or 'the run ended before them'}): {', '.join(missing)}. "
                     if missing else "") + "Settings × rows of the module's plan not asked were not run either."]
    if sec.get("note"):
        lines += ["", sec["note"]]
    g = goals(sec)
    if g:
        lines += ["", "Goals (issue 9):", ""] + [f"- {x}" for x in g]
    notes = []
    for r in sec["rows"]:
        if r.get("tool") == "qtool" and r.get("notes"):
            notes.append(f"qtool {r['label']} {r['setting']}: " + "; ".join(r["notes"]))
            break
    for r in sec["rows"]:
        info = r.get("peer") or {}
        if info:
            notes.append(f"{info.get('peer')} {info.get('version')} ({r['setting']}): config {json.dumps(info.get('config'))}.")
    notes.append("llm-compressor runs at int4 g64 only: its group strategy refuses g128 on SmolLM2's 576-wide inputs. "
                 "qtool's rows are written with -f gptq, which holds the partial last group at g128.")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # a quick look at a saved section: python awq_bench.py results.json
    d = json.loads(Path(sys.argv[1]).read_text())
    print(markdown(d.get("awq", d)))
