"""GPTQ section of the qtool bench: qtool's GPTQ against GPTQModel, on one machine in one run.

    python tests/bench/run_bench.py --gptq-only      (this section alone, merged into results.json)

Protocol (the same for every row and both tools):

* Calibration: `--gptq-samples` windows (default 64) of `--gptq-seq-len` tokens (default 512) from
  the FIRST half of WikiText-2 validation (qtool.evaluate.split_text), tokenized by SmolLM2's
  tokenizer and placed by qtool.calib.data.load_calibration with seed 0: exactly what
  `qtool quantize --dataset wikitext2-valid.txt --samples N --seq-len L` picks (same function, same
  arguments as qtool.pipeline.load_calibration_for). The bench writes those token ids to a JSON
  file and GPTQModel quantizes on them, unchanged (a list of {input_ids, attention_mask}).
* Evaluation: `--gptq-windows` (default 20) non-overlapping 512-token windows of the SECOND half
  (qtool.evaluate.eval_windows), so no row is scored on text it was calibrated on. Every output is
  scored by the same code: its GPTQ folder is dequantized by qtool's GPTQ reader
  (qtool.formats.gptq.read_dequantized, the reference math) into SmolLM2's transformers model in
  float32, and qtool.evaluate.compare gives perplexity, KL(bf16 || model) and top-1 agreement
  against the bf16 model on the same windows.
* Quantization: each run is its own process measured by measure.py (wall time, kernel peak RSS):
  `qtool quantize ... -f gptq` end to end, and GPTQModel's load + quantize + save
  (peer_gptqmodel.py in .cache/gptq-venv, GPTQMODEL_CPU_WORKERS=2). For GPTQModel's folders the
  peer also writes a few modules as GPTQModel itself dequantizes them; the bench checks that
  qtool's reader decodes its file the same way (to bf16 rounding: its torch kernel computes in bf16).

Rows: bf16; RTN int4 g128 (`-f gptq` holds the partial last group of SmolLM2's 576-wide layers:
576 = 4 x 128 + 64); GPTQ int4 g128; GPTQ int4 per-channel; GPTQ int3 g128. Peer runs (by default
every GPTQ recipe, with GPTQModel set to the same algorithm as qtool's defaults: symmetric,
desc_act off, damp 0.01, its group-aware reordering off) and, for int4 g128, GPTQModel's own
defaults too (damp 0.05, act_group_aware on). Both quantize a block's linears in true-sequential
order (q/k/v, o, gate/up, down, each group's Hessians from inputs through the already-quantized
ones). One difference stays: qtool rounds each group's scale to the checkpoint dtype (bf16) before
it computes the codes (the codes then fit the stored scale), GPTQModel quantizes with float32 scales
and stores them as fp16.

A step that cannot run leaves its error in its row; the table prints it instead of numbers.
"""

from __future__ import annotations

import datetime as dt
import gc
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmt  # noqa: E402
from measure import Measured, run_measured  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GIB = 1 << 30
MIB = 1 << 20
DEFAULT_SAMPLES = 64
DEFAULT_SEQ_LEN = 512
DEFAULT_WINDOWS = 20
EVAL_SEQ_LEN = 512
PEER_SCRIPT = Path(__file__).with_name("peer_gptqmodel.py")
# Every measured run (both tools) gets OMP_WAIT_POLICY=PASSIVE: on this shared 2-core machine
# libgomp's default spin-waiting makes torch's 2-thread OpenMP regions stall whenever another job
# holds a core (qtool's GPTQ 4x128-token run: 107 s default vs 28 s passive vs 26 s one thread, load
# ~5.5; GPTQModel: 55 s vs 53 s). One extra row runs qtool int4 g128 as shipped, without it.
OMP_POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}


@dataclass(frozen=True)
class Recipe:
    key: str
    label: str
    flags: tuple[str, ...]  # qtool quantize flags (-f gptq is added)
    peer: dict | None = None  # peer_gptqmodel.py arguments for the same recipe
    extra_peers: dict = field(default_factory=dict)  # label -> arguments (other peer settings)


MATCHED = {"damp": 0.01, "act_group_aware": "off"}  # GPTQModel set to qtool's default algorithm
RECIPES = (
    Recipe("rtn-w4g128", "RTN int4 g128", ("-m", "rtn", "-b", "4", "-g", "128")),
    Recipe("gptq-w4g128", "GPTQ int4 g128", ("-m", "gptq", "-b", "4", "-g", "128"),
           peer={"bits": 4, "group_size": 128, **MATCHED},
           extra_peers={"GPTQModel defaults (damp 0.05, act_group_aware)": {"bits": 4, "group_size": 128}}),
    Recipe("gptq-w4ch", "GPTQ int4 per-channel", ("-m", "gptq", "-b", "4", "-g", "channel"),
           peer={"bits": 4, "group_size": -1, **MATCHED}),
    Recipe("gptq-w3g128", "GPTQ int3 g128", ("-m", "gptq", "-b", "3", "-g", "128"),
           peer={"bits": 3, "group_size": 128, **MATCHED}),
)
PEER_CHOICES = ("all", "matched", "w4g128", "none")  # which peer runs (--gptq-peers)


# -- helpers ---------------------------------------------------------------------------------------
def _err(e: BaseException) -> str:
    lines = [l for l in str(e).splitlines() if l.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def gptq_bpw(folder: Path) -> dict:
    """Bits per quantized weight from the files: 8 x bytes of qweight + qzeros + scales + g_idx over
    the elements of the weights they replace (in x out), counted alike for every tool."""
    from safetensors import safe_open

    by_module: dict[str, dict[str, tuple[int, tuple]]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                prefix, _, suffix = name.rpartition(".")
                if suffix in ("qweight", "qzeros", "scales", "g_idx"):
                    sl = h.get_slice(name)
                    shape = tuple(sl.get_shape())
                    n = 1
                    for d in shape:
                        n *= d
                    size = {"I32": 4, "F16": 2, "BF16": 2, "F32": 4}.get(sl.get_dtype(), 4)
                    by_module.setdefault(prefix, {})[suffix] = (n * size, shape)
    bits = params = 0
    for parts in by_module.values():
        bits += 8 * sum(b for b, _ in parts.values())
        in_f = parts["g_idx"][1][0]
        out_f = parts["scales"][1][1]
        params += in_f * out_f
    return {"bpw": bits / params if params else None, "modules": len(by_module), "params_quantized": params}


def calibration_windows(model: Path, text: Path, samples: int, seq_len: int):
    """The windows `qtool quantize --dataset TEXT --samples N --seq-len L` calibrates on."""
    from qtool.calib.data import load_calibration
    from qtool.evaluate import load_tokenizer

    return load_calibration(str(text), load_tokenizer(model), samples=samples, seq_len=seq_len, seed=0)


def cpu_line(m: dict) -> str:
    """A section's machine record (run_bench.machine_info) as one sentence, for tables whose time ratios hold for one CPU."""
    return (f"CPU: {m.get('cpu_model')} (family/model {m.get('cpu_family_model')}; {', '.join(m.get('cpu_simd') or []) or 'no'} "
            f"SIMD flags of interest; torch {m.get('torch_cpu_capability')}), {m.get('cpus_usable')} usable cores")


def ids_sha256(ids) -> str:
    return hashlib.sha256(json.dumps(ids.tolist()).encode()).hexdigest()


# -- scoring ---------------------------------------------------------------------------------------
class Scoring:
    """The bf16 model (base) and the dequantize-into-float32 route shared by every row."""

    def __init__(self, model: Path, windows) -> None:
        from qtool.evaluate import TorchScorer, load_hf_model

        self.model_dir, self.windows = model, windows
        self.base = TorchScorer(load_hf_model(model), "transformers")
        self.base_ppl: float | None = None

    def score_gptq_folder(self, folder: Path) -> dict:
        from qtool.formats.gptq import read_dequantized

        return self.score_state(folder, read_dequantized, "transformers (dequantized by qtool.formats.gptq)")

    def score_state(self, folder: Path, read_dequantized, label: str) -> dict:
        """`folder` dequantized by `read_dequantized(folder, dtype=)` into the float32 transformers model, scored."""
        from transformers import AutoModelForCausalLM

        from qtool.evaluate import TorchScorer, compare

        t0 = time.perf_counter()
        m = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        state = read_dequantized(folder, dtype=torch.float32)
        res = m.load_state_dict(state, strict=False)
        missing = [k for k in res.missing_keys if not k.endswith("lm_head.weight")]
        if res.unexpected_keys or missing:
            raise RuntimeError(f"{folder}: dequantized state does not fit the model "
                               f"(unexpected {res.unexpected_keys[:3]}, missing {missing[:3]})")
        m.tie_weights()
        scorer = TorchScorer(m.eval(), label)
        out = compare(scorer, self.windows, self.base)
        self.base_ppl = out["base_perplexity"]
        out["score_s"] = round(time.perf_counter() - t0, 1)
        del scorer, m, state
        gc.collect()
        return out

    def score_base(self) -> dict:
        from qtool.evaluate import compare

        t0 = time.perf_counter()
        out = compare(self.base, self.windows)
        out["score_s"] = round(time.perf_counter() - t0, 1)
        self.base_ppl = out["perplexity"]
        return out


# -- runs ------------------------------------------------------------------------------------------
def _measured(cmd: list, env: dict, cwd: Path) -> tuple[Measured, dict]:
    load = os.getloadavg()[0]
    m = run_measured([str(c) for c in cmd], env=env, cwd=cwd)
    fields = {"command": m.cmd, "wall_s": round(m.wall_s, 2), "cpu_s": round(m.cpu_s, 2), "peak_rss_bytes": m.peak_rss_bytes,
              "load_average_before": round(load, 2), "load_average_after": round(os.getloadavg()[0], 2)}
    if m.returncode != 0:
        raise RuntimeError(f"exit {m.returncode}: {m.stderr.strip().splitlines()[-1] if m.stderr.strip() else ''}")
    return m, fields


def qtool_row(r: Recipe, qtool: str, env: dict, model: Path, text: Path, work: Path, samples: int, seq_len: int,
              scoring: Scoring) -> dict:
    out = work / f"qtool-{r.key}"
    calib = ("--dataset", str(text), "--samples", str(samples), "--seq-len", str(seq_len)) if "gptq" in r.flags else ()
    cmd = [qtool, "quantize", str(model), *r.flags, *calib, "-f", "gptq", "-o", str(out), "--overwrite", "--json"]
    m, row = _measured(cmd, env, REPO)
    report = json.loads(m.stdout)
    row.update({"tool": "qtool", "qtool_seconds": report.get("seconds"), "size_bytes": folder_bytes(out),
                **gptq_bpw(out), "qtool_bpw_quantized": report.get("bpw_quantized"),
                "calibration": report.get("calibration")})
    row["eval"] = scoring.score_gptq_folder(out)
    return row


def as_shipped_row(qtool_row_done: dict, env: dict) -> dict:
    """The int4 g128 qtool command again, with the environment as a user has it (no OMP_WAIT_POLICY):
    wall time and peak RSS, and whether it wrote the very same bytes."""
    cmd = list(qtool_row_done["command"])
    out = Path(cmd[cmd.index("-o") + 1])
    ref = out / "model.safetensors"
    want = hashlib.sha256(ref.read_bytes()).hexdigest()
    shipped = {k: v for k, v in env.items() if k != "OMP_WAIT_POLICY"}
    m, row = _measured(cmd, shipped, REPO)
    row["same_bytes_as_passive_run"] = hashlib.sha256(ref.read_bytes()).hexdigest() == want
    row["qtool_seconds"] = json.loads(m.stdout).get("seconds")
    return row


def ensure_gptq_venv() -> Path:
    cache = Path(os.environ.get("QTOOL_CACHE", REPO / ".cache"))
    py = cache / "gptq-venv" / "bin" / "python"
    if not (cache / "gptq-venv" / ".installed").is_file():
        done = subprocess.run(["make", "-C", str(REPO), "gptq-venv"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"make gptq-venv failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return py


def peer_row(label: str, args: dict, py: Path, env: dict, model: Path, calib_json: Path, work: Path, scoring: Scoring) -> dict:
    slug = "gptqmodel-w{bits}{g}".format(bits=args["bits"], g="ch" if args["group_size"] == -1 else f"g{args['group_size']}")
    slug += "-matched" if "damp" in args else "-defaults"
    out, result = work / slug, work / f"{slug}.json"
    result.unlink(missing_ok=True)
    cmd = [py, PEER_SCRIPT, model, calib_json, out, result, "--bits", args["bits"], "--group-size", args["group_size"]]
    if "damp" in args:
        cmd += ["--damp", args["damp"]]
    if "act_group_aware" in args:
        cmd += ["--act-group-aware", args["act_group_aware"]]
    peer_env = {**env, "GPTQMODEL_CPU_WORKERS": "2", "PYTHONNOUSERSITE": "1"}
    peer_env.pop("PYTHONPATH", None)
    m, row = _measured(cmd, peer_env, work)
    info = json.loads(result.read_text())
    row.update({"tool": "GPTQModel", "label": label, "peer": info, "size_bytes": folder_bytes(out), **gptq_bpw(out)})
    row["decode_check"] = decode_check(out, info.get("check") or {})
    row["eval"] = scoring.score_gptq_folder(out)
    return row


def decode_check(folder: Path, check: dict) -> dict:
    """qtool's reader vs GPTQModel's own dequantization of the same modules."""
    if "error" in check or not check.get("file"):
        return {"error": check.get("error", "no check file")}
    from safetensors.torch import load_file

    from qtool.formats.gptq import read_dequantized

    ours = read_dequantized(folder)
    theirs = load_file(check["file"])
    worst, exact = 0.0, 0
    for name, t in theirs.items():
        o = ours[name]
        worst = max(worst, float(((t - o).abs() / o.abs().clamp_min(1e-30)).max()))
        exact += int((o.to(torch.bfloat16).float() == t).sum())
    n = sum(t.numel() for t in theirs.values())
    # GPTQModel's torch kernel dequantizes in bf16 ((q - z) * s with s rounded to bf16, then the
    # product rounded): two roundings, each <= 2^-9 relative, so |ours - theirs| <= 2^-7 |ours|
    return {"modules": sorted(theirs), "max_rel_diff": worst, "agree_to_bf16": worst <= 2**-7,
            "elements": n, "equal_after_rounding_ours_to_bf16": exact}


def run_gptq_section(model: Path, text: Path, work: Path, qtool: str, env: dict, *, samples: int = DEFAULT_SAMPLES,
                     seq_len: int = DEFAULT_SEQ_LEN, windows: int = DEFAULT_WINDOWS, peers: str = "all",
                     recipes: list[str] | None = None, as_shipped: bool = True) -> dict:
    """Every row (see the module doc); never raises: a failing part leaves its error. `recipes`: the
    RECIPES keys to run (default all); `as_shipped`: also the int4 g128 run without OMP_WAIT_POLICY."""
    from qtool.evaluate import eval_windows, load_tokenizer

    t0 = time.perf_counter()
    work = work / "gptq"
    work.mkdir(parents=True, exist_ok=True)
    env = {**env, **OMP_POLICY}
    from gguf_bench import qtool_state

    sec: dict = {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "load_average_at_start": os.getloadavg(), "torch_threads": torch.get_num_threads(), "rows": [], "peers": [],
                 "qtool_code_at_start": qtool_state()}
    calib = calibration_windows(model, text, samples, seq_len)
    calib_json = work / "calibration-ids.json"
    calib_json.write_text(json.dumps({"input_ids": calib.input_ids.tolist()}))
    ev = eval_windows(load_tokenizer(model), text, "eval", EVAL_SEQ_LEN, windows)
    sec["config"] = {"model": str(model), "text": str(text),
                     "calibration": {"part": "calib (first half)", "samples": int(calib.input_ids.shape[0]),
                                     "seq_len": int(calib.input_ids.shape[1]), "seed": 0, "ids_sha256": ids_sha256(calib.input_ids),
                                     "how": "qtool.calib.data.load_calibration, as `qtool quantize --dataset` uses it"},
                     "eval": {"part": "eval (second half)", "windows": int(ev.shape[0]), "seq_len": EVAL_SEQ_LEN,
                              "ids_sha256": ids_sha256(ev)},
                     "peers": peers, "env_for_every_run": OMP_POLICY}
    scoring = Scoring(model, ev)

    def stage(name: str, fn):
        t = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
            traceback.print_exc()
            return {"error": _err(e)}
        finally:
            sec.setdefault("stage_seconds", {})[name] = round(time.perf_counter() - t, 1)

    base = stage("bf16", scoring.score_base)
    sec["rows"].append({"key": "bf16", "label": "bf16 (scored in float32)", "tool": "–", "size_bytes": folder_bytes(model),
                        "bpw": 16.0, "eval": base} if "error" not in base else {"key": "bf16", "label": "bf16", **base})
    chosen = [r for r in RECIPES if recipes is None or r.key in recipes]
    sec["recipes_run"] = [r.key for r in chosen]
    for r in chosen:
        row = stage(r.key, lambda r=r: qtool_row(r, qtool, env, model, text, work, samples, seq_len, scoring))
        sec["rows"].append({"key": r.key, "label": r.label, "recipe": " ".join(r.flags) + " -f gptq", **row})
        if r.key == "gptq-w4g128" and "error" not in row and as_shipped:
            sec["as_shipped"] = stage("as_shipped", lambda row=row: as_shipped_row(row, env))

    wanted = []
    for r in chosen:
        if r.peer and (peers in ("all", "matched") or (peers == "w4g128" and r.key == "gptq-w4g128")):
            wanted.append((r.key, "GPTQModel, same algorithm (damp 0.01, act_group_aware off)", r.peer))
        if peers == "all":
            wanted += [(r.key, label, a) for label, a in r.extra_peers.items()]
    if wanted:
        try:
            py = ensure_gptq_venv()
        except Exception as e:  # noqa: BLE001
            py = None
            sec["peer_error"] = _err(e)
        for key, label, args in wanted:
            if py is None:
                row = {"error": f"GPTQModel unavailable: {sec['peer_error']}"}
            else:
                row = stage(f"peer-{key}-{label}", lambda a=args, l=label: peer_row(l, a, py, env, model, calib_json, work, scoring))
            sec["peers"].append({"key": key, "label": label, "args": args, **row})
    else:
        sec["peer_note"] = f"--gptq-peers {peers}: GPTQModel not run"
    sec["seconds"] = round(time.perf_counter() - t0, 1)
    sec["qtool_code_at_end"] = qtool_state()
    sec["qtool_code_changed_during_run"] = sec["qtool_code_at_end"] != sec["qtool_code_at_start"]
    return sec


# -- markdown --------------------------------------------------------------------------------------
def _cells(d: dict, base_ppl: float | None) -> list[str]:
    """wall, peak RSS, size, bpw, ppl, ppl/bf16, KLD, top-1"""
    ev = d.get("eval") or {}
    ppl = ev.get("perplexity")
    return [fmt.seconds(d.get("wall_s")), fmt.size(d.get("peak_rss_bytes")), fmt.size(d.get("size_bytes")),
            f"{d['bpw']:.3f}" if d.get("bpw") else "–",
            f"{ppl:.3f}" if ppl else "–", f"{ppl / base_ppl:.4f}" if ppl and base_ppl else "–",
            f"{ev['kld_mean']:.4f}" if ev.get("kld_mean") is not None else "–",
            f"{100 * ev['top1_agreement']:.2f} %" if ev.get("top1_agreement") is not None else "–"]


def markdown(sec: dict) -> str:
    lines = ["## GPTQ vs GPTQModel", ""]
    if "error" in sec:
        return "\n".join(lines + [f"Not run: {sec['error']}", ""])
    cfg = sec.get("config", {})
    cal, ev = cfg.get("calibration", {}), cfg.get("eval", {})
    base = next((r for r in sec["rows"] if r.get("key") == "bf16"), {})
    base_ppl = (base.get("eval") or {}).get("perplexity")
    la = sec.get("load_average_at_start", [0])[0]
    code = sec.get("qtool_code_at_start", {})
    if code:
        lines += [f"qtool at {code.get('commit', '')[:8]} (uncommitted qtool/ diff {code.get('qtool_diff_sha1')})."
                  + (" **qtool's code changed while this section ran: its rows may mix two versions.**"
                     if sec.get("qtool_code_changed_during_run") else ""), ""]
    lines += [
        f"{sec.get('date_utc', '')}: one run, {sec.get('seconds', 0):.0f} s for the whole section (load average at its start {la:.2f}).",
        "",
        f"SmolLM2-135M-Instruct (bf16). Calibration, the same token windows for every run of both tools: {cal.get('samples')} × "
        f"{cal.get('seq_len')} tokens from the first half of WikiText-2 validation (qtool's seeded windows, seed 0; token ids sha256 "
        f"{str(cal.get('ids_sha256'))[:12]}). Scored on {ev.get('windows')} × {ev.get('seq_len')} tokens of the second half, every "
        "output the same way: its GPTQ folder dequantized by qtool's GPTQ reader into the transformers model in float32; "
        "KLD = mean KL(bf16 ‖ model) per token, top-1 = agreement of the argmax with bf16's. Quantize wall time and peak RSS: "
        "the whole run of each tool as its own process (load, calibrate, quantize, save; kernel ru_maxrss). "
        "bpw: 8 × bytes of qweight+qzeros+scales+g_idx / quantized weights, the same count for both tools.",
        "",
        "| recipe | tool | quantize wall | peak RSS | size | bpw | perplexity | ppl / bf16 | KLD | top-1 | time qtool/peer | ppl qtool/peer |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    peers_by_key: dict[str, list[dict]] = {}
    for p in sec.get("peers", []):
        peers_by_key.setdefault(p["key"], []).append(p)
    for r in sec["rows"]:
        if "error" in r:
            lines.append(f"| {r.get('label')} | qtool | not run: {r['error']} | | | | | | | | | |")
        else:
            tool = "–" if r.get("key") == "bf16" else "qtool"
            lines.append(f"| {r.get('label')} | {tool} | {' | '.join(_cells(r, base_ppl))} | | |")
        shipped = sec.get("as_shipped")
        if r.get("key") == "gptq-w4g128" and shipped:
            if "error" in shipped:
                lines.append(f"| {r.get('label')} | qtool, OpenMP default wait policy | not run: {shipped['error']} | | | | | | | | | |")
            else:
                same = "same file" if shipped.get("same_bytes_as_passive_run") else "**different file**"
                lines.append(f"| {r.get('label')} | qtool, OpenMP default wait policy | {fmt.seconds(shipped['wall_s'])} | "
                             f"{fmt.size(shipped['peak_rss_bytes'])} | {same} | | | | | | | |")
        for p in peers_by_key.get(r.get("key"), []):
            if "error" in p:
                lines.append(f"| {r.get('label')} | {p['label']} | not run: {p['error']} | | | | | | | | | |")
                continue
            ours_ppl = (r.get("eval") or {}).get("perplexity")
            theirs_ppl = (p.get("eval") or {}).get("perplexity")
            t_ratio = f"**{r['wall_s'] / p['wall_s']:.2f}×**" if r.get("wall_s") and p.get("wall_s") else "–"
            p_ratio = f"**{ours_ppl / theirs_ppl:.4f}**" if ours_ppl and theirs_ppl else "–"
            lines.append(f"| {r.get('label')} | {p['label']} | {' | '.join(_cells(p, base_ppl))} | {t_ratio} | {p_ratio} |")
    if sec.get("peer_note"):
        lines += ["", sec["peer_note"]]
    notes = []
    for r in sec["rows"]:
        if r.get("qtool_seconds") is not None:
            notes.append(f"qtool {r['label']}: `qtool quantize` reports {r['qtool_seconds']:.1f} s of its own; "
                         f"load average {r.get('load_average_before')} before, {r.get('load_average_after')} after.")
    rows_by_key = {r.get("key"): r for r in sec["rows"]}
    for p in sec.get("peers", []):
        ours = rows_by_key.get(p["key"]) or {}
        if ours.get("cpu_s") and p.get("cpu_s"):
            notes.append(f"{p['key']}: CPU time (user + system) qtool {ours['cpu_s']:.1f} s, {p['label']} {p['cpu_s']:.1f} s: "
                         f"**{ours['cpu_s'] / p['cpu_s']:.2f}×**.")
    for p in sec.get("peers", []):
        info = p.get("peer") or {}
        if info:
            notes.append(f"GPTQModel {info.get('version')} {p['label']} ({p['key']}): quantize() {info.get('quantize_s', 0):.1f} s, load "
                         f"{info.get('load_s', 0):.1f} s, save {info.get('save_s', 0):.1f} s; config {json.dumps(info.get('config'))}; "
                         f"load average {p.get('load_average_before')} before, {p.get('load_average_after')} after.")
        dc = p.get("decode_check")
        if dc:
            if "error" in dc:
                notes.append(f"{p['key']} / {p['label']}: decode cross-check not done ({dc['error']}).")
            else:
                notes.append(f"{p['key']} / {p['label']}: qtool's GPTQ reader (float32) vs GPTQModel's own dequantization (bf16) of "
                             f"{len(dc['modules'])} modules: largest difference {dc['max_rel_diff']:.2g} of the weight "
                             f"({'within' if dc['agree_to_bf16'] else 'BEYOND'} two bf16 roundings, 2^-7); "
                             f"{dc['equal_after_rounding_ours_to_bf16'] / dc['elements']:.1%} of the weights equal once ours are rounded to bf16.")
    notes.append("Every quantize run above has OMP_WAIT_POLICY=PASSIVE in its environment (both tools): on this shared "
                 "2-core machine libgomp's default spin-waiting stalls torch's 2-thread OpenMP regions whenever another job "
                 "holds a core; GPTQModel is insensitive to it. The row 'qtool, OpenMP default wait policy' is the same "
                 "int4 g128 command without it (as a user runs qtool today).")
    notes.append("RTN int4 g128 is written with `-f gptq`, which holds SmolLM2's partial last group (576 = 4 × 128 + 64); "
                 "compressed-tensors would have asked for g64 there.")
    notes.append("GPTQModel runs are set to qtool's default algorithm (symmetric, desc_act off, damp 0.01, act_group_aware off, "
                 "true-sequential like qtool) unless labelled 'GPTQModel defaults'. Left different: qtool computes codes against "
                 "scales rounded to bf16 (the checkpoint dtype), GPTQModel against float32 scales it then stores as fp16. "
                 "time qtool/peer: ratio of end-to-end wall times (< 1: qtool faster); ppl qtool/peer < 1: qtool's perplexity lower.")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # a quick look at a saved section: python gptq_bench.py results.json
    print(markdown(json.loads(Path(sys.argv[1]).read_text())["gptq"]))
