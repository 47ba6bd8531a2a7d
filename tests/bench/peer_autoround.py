"""Peer rows of the learned-rounding bench: AutoRound quantizes SmolLM2 on the very calibration
windows qtool used, with the same iteration count, and saves its `auto_gptq` folder (or, with
`--format gguf:q4_k_m` / `gguf:q4_0` / ..., its GGUF export: scheme `GGUF:<TYPE>`, the bit width,
group size and symmetry of that GGUF type, a folder holding one .gguf file, named in RESULT.json).

Runs with the python of the isolated GPTQ environment (`make autoround-venv`, .cache/gptq-venv): it
imports neither qtool nor anything of the main environment. autoround_bench.py runs it as a measured
child process (load + tune + save) and scores the folder with the same code as qtool's rows.

    .cache/gptq-venv/bin/python tests/bench/peer_autoround.py MODEL_DIR CALIB.json OUT_DIR RESULT.json \\
        --bits 4 --group-size 128 --iters 50
    .cache/gptq-venv/bin/python tests/bench/peer_autoround.py MODEL_DIR CALIB.json OUT_DIR RESULT.json \\
        --format gguf:q4_k_m --iters 50      (needs gguf and sentencepiece there: `make autoround-venv`)

CALIB.json: {"input_ids": [[...], ...]}, the token windows (all of one length), handed to AutoRound
as its dataset (a list of [1, L] tensors: its calibration loop takes tensors as they are).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("calib", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("result", type=Path)
    ap.add_argument("--bits", type=int, help="required for auto_gptq; a gguf format sets its own")
    ap.add_argument("--group-size", type=int)
    ap.add_argument("--format", default="auto_gptq", help="auto_gptq, or gguf:q4_k_m, gguf:q4_0, ... (AutoRound's names)")
    ap.add_argument("--iters", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--asym", action="store_true")
    args = ap.parse_args()
    gguf = args.format.lower().startswith("gguf:")
    if not gguf and (args.bits is None or args.group_size is None):
        ap.error(f"--bits and --group-size are required for --format {args.format}")

    t_start = time.perf_counter()
    import torch
    from auto_round import AutoRound
    from auto_round.version import __version__ as ar_version
    from transformers import AutoModelForCausalLM, AutoTokenizer

    windows = json.loads(args.calib.read_text())["input_ids"]
    data = [torch.tensor([ids], dtype=torch.long) for ids in windows]
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(args.model))
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    t_load = time.perf_counter() - t0
    # a GGUF scheme brings its own bits / group size / symmetry (explicit ones would override them)
    grid = {} if gguf else {"bits": args.bits, "group_size": args.group_size, "sym": not args.asym}
    scheme = args.format.upper() if gguf else f"W{args.bits}A16"
    ar = AutoRound(model, tokenizer=tok, scheme=scheme, **grid, iters=args.iters, nsamples=len(data), seqlen=len(windows[0]),
                   batch_size=args.batch_size, dataset=data, device_map="cpu", seed=42)
    t0 = time.perf_counter()
    ar.quantize_and_save(str(args.out), format=args.format)
    t_quant = time.perf_counter() - t0
    files = sorted(args.out.rglob("*.gguf")) if gguf else []
    if gguf and len(files) != 1:
        raise SystemExit(f"expected one .gguf file under {args.out}, found {[str(f) for f in files]}")
    result = {"peer": "AutoRound", "version": ar_version, "torch": torch.__version__,
              "config": {"scheme": scheme, **grid, "iters": args.iters, "batch_size": args.batch_size, "format": args.format,
                         "model_dtype": "float32"},
              **({"gguf_file": str(files[0])} if gguf else {}),
              "calibration": {"samples": len(windows), "seq_len": len(windows[0]) if windows else 0},
              "load_s": t_load, "quantize_and_save_s": t_quant, "run_s": time.perf_counter() - t_start,
              "torch_threads": torch.get_num_threads(), "omp": os.environ.get("OMP_WAIT_POLICY")}
    args.result.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
