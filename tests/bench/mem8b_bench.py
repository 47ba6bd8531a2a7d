"""Memory at scale (issue 12): a random bf16 checkpoint shaped like Llama-3.1-8B (its widths, heads
and depth; SmolLM2's vocabulary and tokenizer, so that llama.cpp's converter takes it: ~7.4 B
parameters, ~14.8 GB on disk, generated here and never committed) -> RTN int4 g128
compressed-tensors and -> GGUF Q4_K_M, peak RSS against the 3 GiB budget, beside llama.cpp's
convert_hf_to_gguf (bf16) + llama-quantize Q4_K_M on the same folder; the two Q4_K_M files are
compared tensor by tensor (types and bytes).

    python tests/bench/mem8b_bench.py [--out tests/bench/results] [--preset 8b|tiny] [--keep]

Needs ~35 GB of free disk (the checkpoint, llama.cpp's bf16 GGUF, two Q4_K_M files; everything but
the checkpoint is deleted after its row, the checkpoint too unless --keep). Each command is one
process measured by measure.py: wall, kernel peak RSS (ru_maxrss, which counts file pages a process
has mapped and touched, as llama-quantize's mmap of its input does) and sampled anonymous /
file-backed peaks. `--preset tiny` builds a few-MB model to develop the bench itself.
Output: memory-8b.json and memory-8b.md in --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf_bench as gb  # noqa: E402
import random_llama  # noqa: E402
import run_bench  # noqa: E402

GIB = 1 << 30
BUDGET = 3 * GIB
SMOL_VOCAB = 49152
random_llama.PRESETS.setdefault("8b", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                           num_attention_heads=32, num_key_value_heads=8, vocab_size=SMOL_VOCAB))


def build_with_tokenizer(work: Path, smol: Path, preset: str) -> Path:
    """The random checkpoint with SmolLM2's tokenizer files and `architectures` (cached in `work`)."""
    out = work / f"random-llama-{preset}-tok"
    if (out / gb.TOK_MARK).is_file():
        return out
    random_llama.build(out, preset)
    assert random_llama.PRESETS[preset]["vocab_size"] == SMOL_VOCAB, "the tokenizer files are SmolLM2's: the vocabulary must be its size"
    gb.add_tokenizer(out, smol)
    return out


def _verdict(m: dict) -> dict:
    return {**m, "rss_budget_bytes": BUDGET, "rss_pass": m["peak_rss_bytes"] <= BUDGET}


def run(work: Path, smol: Path, preset: str, keep: bool) -> dict:
    from llama_cpp_tools import ensure_llama_cpp

    qtool, env = run_bench.qtool_exe(), run_bench.child_env()
    t0 = time.perf_counter()
    src = build_with_tokenizer(work, smol, preset)
    sec: dict = {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "load_average_at_start": os.getloadavg(),
                 "qtool_code_at_start": gb.qtool_state(), "machine": run_bench.machine_info(), "preset": preset,
                 "config": random_llama.PRESETS[preset], "input": str(src), "build_s": round(time.perf_counter() - t0, 1),
                 "input_bytes": sum(f.stat().st_size for f in src.glob("*.safetensors")), "rows": {}}
    rows = sec["rows"]
    ct = work / f"mem-{preset}-rtn-ct"
    try:
        cmd = [qtool, "quantize", src, "-b", "4", "-g", "128", "-f", "compressed-tensors", "-o", ct, "--overwrite", "--json"]
        rows["qtool RTN int4 g128 -> compressed-tensors"] = _verdict(gb._measure(cmd, env, "qtool quantize RTN"))
    except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
        rows["qtool RTN int4 g128 -> compressed-tensors"] = {"error": gb._err(e)}
    shutil.rmtree(ct, ignore_errors=True)
    q_out, l_bf16, l_out = work / f"mem-{preset}.qtool.Q4_K_M.gguf", work / f"mem-{preset}.llama.bf16.gguf", work / f"mem-{preset}.llama.Q4_K_M.gguf"
    try:
        rows["qtool -> GGUF Q4_K_M"] = _verdict({**gb.qtool_quantize(qtool, env, src, q_out, "Q4_K_M"), **gb.gguf_stats(q_out)})
    except Exception as e:  # noqa: BLE001
        rows["qtool -> GGUF Q4_K_M"] = {"error": gb._err(e)}
    tools = ensure_llama_cpp(run_bench.cache_dir())
    try:
        rows["llama.cpp convert_hf_to_gguf --outtype bf16"] = {**gb.llama_convert(tools, src, l_bf16), "size_bytes": l_bf16.stat().st_size}
        rows["llama.cpp llama-quantize Q4_K_M"] = {**gb.llama_quantize(tools, l_bf16, l_out, "Q4_K_M"), **gb.gguf_stats(l_out)}
    except Exception as e:  # noqa: BLE001
        rows["llama.cpp"] = {"error": gb._err(e)}
    l_bf16.unlink(missing_ok=True)
    if q_out.is_file() and l_out.is_file():
        try:
            sec["compare_q4_k_m"] = gb.compare_tensors(q_out, l_out)
        except Exception as e:  # noqa: BLE001
            sec["compare_q4_k_m"] = {"error": gb._err(e)}
    gb.forget_readers()
    for p in (q_out, l_out):
        p.unlink(missing_ok=True)
    if not keep:
        shutil.rmtree(src, ignore_errors=True)
    sec["bench_s"] = round(time.perf_counter() - t0, 1)
    return sec


def markdown(sec: dict) -> str:
    cfg = sec["config"]
    lines = ["## Memory at scale: a random checkpoint shaped like Llama-3.1-8B (issue 12)", "",
             f"{sec['date_utc']}, load average at start {sec['load_average_at_start'][0]:.2f}, qtool at "
             f"{(sec['qtool_code_at_start'].get('commit') or '?')[:7]}. `python tests/bench/mem8b_bench.py`. Input: random bf16, "
             f"hidden {cfg['hidden_size']}, intermediate {cfg['intermediate_size']}, {cfg['num_hidden_layers']} blocks, "
             f"{cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} KV heads (preset {sec['preset']}), vocabulary {cfg['vocab_size']} "
             f"(SmolLM2's tokenizer; Llama-3.1's is 128,256), {sec['input_bytes'] / 1e9:.1f} GB of safetensors "
             f"(built in {sec['build_s']:.0f} s). Budget: peak RSS ≤ {BUDGET / GIB:.0f} GiB for qtool's two rows.", "",
             "| command | wall | peak RSS (ru_maxrss) | sampled anon / file-backed peak | budget |", "|---|---:|---:|---:|---|"]
    for name, r in sec["rows"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:300]} | | | |")
            continue
        anon, fil = r.get("sampled_peak_rss_anon_bytes") or 0, r.get("sampled_peak_rss_file_bytes") or 0
        budget = (f"{'pass' if r['rss_pass'] else '**missed**'} (≤ {BUDGET / GIB:.0f} GiB)") if "rss_pass" in r else "–"
        lines.append(f"| {name} | {r['wall_s']:.0f} s | {r['peak_rss_bytes'] / GIB:.2f} GiB | {anon / GIB:.2f} / {fil / GIB:.2f} GiB | {budget} |")
    c = sec.get("compare_q4_k_m")
    if c:
        lines += ["", "Q4_K_M, qtool vs llama.cpp: " + (c["error"] if "error" in c else
                  f"{c['tensors']} tensors compared; {'identical types and bytes' if c['identical_bytes'] else 'NOT identical'} "
                  f"(type mismatches {c['type_mismatches']}, byte mismatches {c['byte_mismatches']})"
                  + (f", e.g. {c['byte_mismatch_examples'] or c['type_mismatch_examples']}" if not c["identical_bytes"] else "") + ".")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=run_bench.REPO / "tests/bench/results")
    ap.add_argument("--preset", default="8b", choices=["8b", "tiny"])
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    args = ap.parse_args(argv)
    smol = run_bench.cache_dir() / "SmolLM2-135M-Instruct-bf16"
    work = run_bench.cache_dir() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    sec = run(work, smol, args.preset, args.keep)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory-8b.json").write_text(json.dumps(sec, indent=2, default=str) + "\n")
    (args.out / "memory-8b.md").write_text(markdown(sec))
    print(markdown(sec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
