"""Non-llama architectures section of the qtool bench: random ~1 B qwen3_moe and gemma3_text.

    python tests/bench/run_bench.py --arch-only      (this section alone: arch.json, merged into results.json)

For each architecture (random_arch.py builds the checkpoint once under $QTOOL_CACHE/bench/arch/,
bf16, SmolLM2's tokenizer files), every command runs alone under measure.py (wall time, peak RSS =
the kernel's ru_maxrss of that one process):

  1. `qtool quantize DIR -m rtn -b 4 -g 128 -f compressed-tensors`: time, peak RSS (budget 1.5 GiB),
     size, bpw (qtool's report);
  2. `qtool quantize DIR -f gguf -t Q4_K_M` against llama.cpp's `convert_hf_to_gguf.py --outtype bf16`
     + `llama-quantize BF16.gguf OUT.gguf Q4_K_M` (llama.cpp of tests/llama_cpp_tools.py): time and
     peak RSS of each; the two Q4_K_M files compared tensor by tensor with gguf.GGUFReader (type,
     shape, data bytes), as in the GGUF section.

Random weights: no perplexity here (the architectures' output quality is proven by the tests
against transformers and llama.cpp: tests/test_gguf_archs.py, test_architectures.py).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmt  # noqa: E402
import gguf_bench as gb  # noqa: E402
import random_arch  # noqa: E402
from measure import run_measured  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
RSS_BUDGET_BYTES = gb.RSS_BUDGET_BYTES
ARCHS = ("qwen3_moe-1b", "gemma3_text-1b")
CT_FLAGS = ["-m", "rtn", "-b", "4", "-g", "128"]


def _folder_bytes(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def ct_row(qtool: str, env: dict, src: Path, out: Path) -> dict:
    cmd = [str(c) for c in (qtool, "quantize", src, *CT_FLAGS, "-f", "compressed-tensors", "-o", out, "--overwrite", "--json")]
    m = run_measured(cmd, env=env, cwd=REPO)
    if m.returncode != 0:
        raise RuntimeError(f"qtool quantize -f compressed-tensors exited {m.returncode}:\n{(m.stderr or m.stdout)[-3000:]}")
    report = json.loads(m.stdout)
    return {"command": m.cmd, "wall_s": round(m.wall_s, 2), "peak_rss_bytes": m.peak_rss_bytes,
            "sampled_peak_rss_anon_bytes": m.sampled_peaks_bytes.get("RssAnon"),
            "sampled_peak_rss_file_bytes": m.sampled_peaks_bytes.get("RssFile"),
            "size_bytes": _folder_bytes(out), "bpw": report.get("bpw_quantized"), "params_total": report.get("params_total"),
            "qtool_seconds": report.get("seconds"), "rss_pass": m.peak_rss_bytes < RSS_BUDGET_BYTES}


def gguf_rows(tools, qtool: str, env: dict, src: Path, work: Path, tag: str) -> dict:
    q_out, l_bf16, l_out = work / f"{tag}.qtool.Q4_K_M.gguf", work / f"{tag}.llama.bf16.gguf", work / f"{tag}.llama.Q4_K_M.gguf"
    row: dict = {}
    try:
        row["qtool"] = {**gb.qtool_quantize(qtool, env, src, q_out, "Q4_K_M"), **gb.gguf_stats(q_out)}
        row["qtool"]["rss_pass"] = row["qtool"]["peak_rss_bytes"] < RSS_BUDGET_BYTES
    except Exception as e:  # noqa: BLE001
        row["qtool"] = {"error": gb._err(e)}
    try:
        steps = {"convert_hf_to_gguf (bf16)": gb.llama_convert(tools, src, l_bf16)}
        steps["convert_hf_to_gguf (bf16)"]["size_bytes"] = l_bf16.stat().st_size
        steps["llama-quantize Q4_K_M"] = {**gb.llama_quantize(tools, l_bf16, l_out, "Q4_K_M"), **gb.gguf_stats(l_out)}
        row["llama_cpp"] = {"steps": steps, **gb._pair_total(steps)}
    except Exception as e:  # noqa: BLE001
        row["llama_cpp"] = {"error": gb._err(e)}
    q, l = row["qtool"], row["llama_cpp"]
    if "error" not in q and "error" not in l:
        row["ratio_wall"] = round(q["wall_s"] / l["wall_s"], 3)
        row["ratio_peak_rss"] = round(q["peak_rss_bytes"] / l["peak_rss_bytes"], 3)
        try:
            row["compare"] = gb.compare_tensors(q_out, l_out)
        except Exception as e:  # noqa: BLE001
            row["compare"] = {"error": gb._err(e)}
    gb.forget_readers()
    for f in (q_out, l_bf16, l_out):  # 0.6-2 GB each that nothing reuses
        f.unlink(missing_ok=True)
    return row


def run_arch_section(model: Path, work: Path, qtool: str, env: dict, archs: tuple[str, ...] = ARCHS) -> dict:
    """One row per architecture (see the module doc); never raises: a failing part leaves its error."""
    t0 = time.perf_counter()
    work = work / "arch"
    work.mkdir(parents=True, exist_ok=True)
    sec: dict = {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "load_average_at_start": os.getloadavg(), "qtool_code_at_start": gb.qtool_state(),
                 "rss_budget_bytes": RSS_BUDGET_BYTES, "ct_flags": CT_FLAGS, "rows": []}
    try:
        from llama_cpp_tools import ensure_llama_cpp

        tools = ensure_llama_cpp(Path(os.environ.get("QTOOL_CACHE", REPO / ".cache")))
        sec["llama_cpp"] = {k: str(v) for k, v in vars(tools).items()}
    except Exception as e:  # noqa: BLE001
        tools = None
        sec["llama_cpp_error"] = f"llama.cpp unavailable: {gb._err(e)}"
    for preset in archs:
        row: dict = {"preset": preset, "config": random_arch.PRESETS[preset]}
        sec["rows"].append(row)
        try:
            t = time.perf_counter()
            src = random_arch.build(work / f"random-{preset}", preset, tokenizer_from=model)
            row.update(input=str(src), input_bytes=_folder_bytes(src), build_s=round(time.perf_counter() - t, 1))
            out = work / f"{preset}-rtn-int4-g128"
            try:
                row["compressed_tensors"] = ct_row(qtool, env, src, out)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row["compressed_tensors"] = {"error": gb._err(e)}
            finally:
                import shutil

                shutil.rmtree(out, ignore_errors=True)
            if tools is None:
                row["gguf"] = {"error": sec["llama_cpp_error"]}
            else:
                row["gguf"] = gguf_rows(tools, qtool, env, src, work, preset)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row["error"] = gb._err(e)
        print(f"[arch bench] {preset} done", file=sys.stderr, flush=True)
    sec["seconds"] = round(time.perf_counter() - t0, 1)
    sec["qtool_code_at_end"] = gb.qtool_state()
    sec["qtool_code_changed_during_run"] = sec["qtool_code_at_end"] != sec["qtool_code_at_start"]
    return sec


# -- markdown --------------------------------------------------------------------------------------
def _pass(d: dict) -> str:
    return "–" if "rss_pass" not in d else ("**pass**" if d["rss_pass"] else "**FAIL**")


def markdown(sec: dict) -> str:
    lines = ["## Non-llama architectures: random ~1 B qwen3_moe and gemma3_text", ""]
    la = sec.get("load_average_at_start", [0])[0]
    code = sec.get("qtool_code_at_start", {})
    lines += [f"{sec.get('date_utc', '')}: one run, {sec.get('seconds', 0):.0f} s for the whole section (load average at its start {la:.2f}); "
              f"qtool at {code.get('commit', '')[:8]}"
              + (" (**its code changed during the run**)" if sec.get("qtool_code_changed_during_run") else "") + ". "
              "Random bf16 checkpoints from tests/bench/random_arch.py (seeded; SmolLM2's tokenizer files). Every command measured "
              "alone (wall time; peak RSS = kernel ru_maxrss of that process); llama.cpp's pipeline = the sum of its two steps' wall "
              "times, the larger of their peak RSS.", "",
              "| model | tool / step | wall | peak RSS | output size | bpw | peak RSS < 1.5 GiB |",
              "|---|---|---:|---:|---:|---:|---|"]
    notes = []
    for r in sec.get("rows", []):
        name = f"{r['preset']} ({(r.get('compressed_tensors') or {}).get('params_total') or 0:,} params, {fmt.size(r.get('input_bytes'))} bf16)"
        if "error" in r:
            lines.append(f"| {name} | not run: {r['error']} | | | | | |")
            continue
        ct = r.get("compressed_tensors", {})
        if "error" in ct:
            lines.append(f"| {name} | qtool RTN int4 g128 → compressed-tensors: not run: {ct['error']} | | | | | **FAIL** |")
        else:
            lines.append(f"| {name} | qtool `quantize {' '.join(CT_FLAGS)} -f compressed-tensors` | {fmt.seconds(ct['wall_s'])} "
                         f"| {fmt.size(ct['peak_rss_bytes'])} | {fmt.size(ct['size_bytes'])} | {ct['bpw']:.3f} | {_pass(ct)} |")
        g = r.get("gguf", {})
        q = g.get("qtool", {})
        if "error" in q:
            lines.append(f"| | qtool `quantize -f gguf -t Q4_K_M`: not run: {q['error']} | | | | | **FAIL** |")
        elif q:
            lines.append(f"| | qtool `quantize -f gguf -t Q4_K_M` | {fmt.seconds(q['wall_s'])} | {fmt.size(q['peak_rss_bytes'])} "
                         f"| {fmt.size(q['size_bytes'])} | {q['bpw']:.3f} | {_pass(q)} |")
        l = g.get("llama_cpp", {})
        if "error" in l:
            lines.append(f"| | llama.cpp: not run: {l['error']} | | | | | |")
        elif l:
            for step, st in l["steps"].items():
                bpw = f"{st['bpw']:.3f}" if "bpw" in st else "–"
                lines.append(f"| | llama.cpp {step} | {fmt.seconds(st['wall_s'])} | {fmt.size(st['peak_rss_bytes'])} | {fmt.size(st.get('size_bytes'))} | {bpw} | – |")
            lines.append(f"| | llama.cpp total | {fmt.seconds(l['wall_s'])} | {fmt.size(l['peak_rss_bytes'])} | | | – |")
        if "ratio_wall" in g:
            lines.append(f"| | **qtool / llama.cpp (GGUF Q4_K_M)** | **{g['ratio_wall']:.2f}×** | **{g['ratio_peak_rss']:.2f}×** | | | |")
            notes.append(f"{r['preset']}: Q4_K_M files, qtool vs llama.cpp: {gb._same(g.get('compare'))}.")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # a quick look at a saved section: python arch_bench.py arch.json
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
