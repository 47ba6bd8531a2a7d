"""Peer rows of the GPTQ bench: GPTQModel quantizes SmolLM2 on the very calibration windows qtool used.

Runs with the python of the isolated GPTQModel environment (`make gptq-venv`, .cache/gptq-venv): it
imports neither qtool nor anything of the main environment. The bench (gptq_bench.py) runs it as a
measured child process (wall time and peak RSS of the whole run: load, quantize, save) and scores
the folder it writes with the same perplexity code as qtool's rows (qtool's GPTQ reader
dequantizes it into the float32 transformers model).

    GPTQMODEL_CPU_WORKERS=2 .cache/gptq-venv/bin/python tests/bench/peer_gptqmodel.py \\
        MODEL_DIR CALIB.json OUT_DIR RESULT.json --bits 4 --group-size 128

CALIB.json: {"input_ids": [[...], ...]}, the token windows (all of one length). After saving, the
folder is loaded back with GPTQModel's torch kernel and a few modules' weights are dequantized by
GPTQModel itself into OUT_DIR/../<name>.peer-dequant.safetensors, so the bench can check that
qtool's reader decodes the file as GPTQModel means it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

CHECK_MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.29.mlp.up_proj")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("calib", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("result", type=Path)
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, required=True, help="-1: per channel")
    ap.add_argument("--damp", type=float, default=None, help="damp_percent (default: GPTQModel's)")
    ap.add_argument("--act-group-aware", choices=("default", "on", "off"), default="default",
                    help="GPTQModel's group-aware reordering (GAR); 'default' leaves its default (on for GPTQ)")
    ap.add_argument("--no-check", action="store_true", help="skip the reload + dequantize cross-check")
    args = ap.parse_args()

    t_start = time.perf_counter()
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.version import __version__ as gptqmodel_version

    windows = json.loads(args.calib.read_text())["input_ids"]
    calibration = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in windows]
    kw: dict = {"bits": args.bits, "group_size": args.group_size, "sym": True, "desc_act": False}
    if args.damp is not None:
        kw["damp_percent"] = args.damp
    if args.act_group_aware != "default":
        kw["act_group_aware"] = args.act_group_aware == "on"
    qcfg = QuantizeConfig(**kw)

    t0 = time.perf_counter()
    model = GPTQModel.load(str(args.model), qcfg)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.quantize(calibration, batch_size=1)
    t_quant = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save(str(args.out))
    t_save = time.perf_counter() - t0
    del model
    total = time.perf_counter() - t_start

    result = {
        "peer": "GPTQModel", "version": gptqmodel_version, "torch": torch.__version__,
        "config": {k: (v if isinstance(v, (int, float, bool, str, type(None))) else str(v)) for k, v in {
            "bits": qcfg.bits, "group_size": qcfg.group_size, "sym": qcfg.sym, "desc_act": qcfg.desc_act,
            "damp_percent": getattr(qcfg, "damp_percent", None), "act_group_aware": getattr(qcfg, "act_group_aware", None),
            "true_sequential": qcfg.true_sequential, "static_groups": getattr(qcfg, "static_groups", None),
            "mse": getattr(qcfg, "mse", None)}.items()},
        "calibration": {"samples": len(windows), "seq_len": len(windows[0]) if windows else 0},
        "load_s": t_load, "quantize_s": t_quant, "save_s": t_save, "run_s_before_check": total,
        "cpu_workers": os.environ.get("GPTQMODEL_CPU_WORKERS"), "torch_threads": torch.get_num_threads(),
    }
    if not args.no_check:
        result["check"] = cross_check(args.out, BACKEND, GPTQModel, torch)
    args.result.write_text(json.dumps(result, indent=2))


def cross_check(out: Path, BACKEND, GPTQModel, torch) -> dict:
    """GPTQModel's own dequantization of a few modules of the saved folder, written beside it."""
    from safetensors.torch import save_file

    dest = out.parent / f"{out.name}.peer-dequant.safetensors"
    try:
        model = GPTQModel.load(str(out), backend=BACKEND.TORCH, device="cpu")
        mods = dict(model.model.named_modules())
        tensors = {}
        for name in CHECK_MODULES:
            m = mods.get(name)
            if m is not None and hasattr(m, "dequantize_weight"):
                with torch.no_grad():
                    tensors[f"{name}.weight"] = m.dequantize_weight().T.float().contiguous()  # [out, in]
        save_file(tensors, str(dest))
        return {"file": str(dest), "modules": sorted(tensors)}
    except Exception as e:  # noqa: BLE001 - a peer's failure is reported in the table, not raised
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}


if __name__ == "__main__":
    main()
