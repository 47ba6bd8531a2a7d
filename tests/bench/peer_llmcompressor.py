"""Peer rows of the AWQ bench: llm-compressor's AWQ quantizes SmolLM2 on the very calibration windows qtool used.

Runs with the python of the isolated llm-compressor environment (`make llmcompressor-venv`,
.cache/llmcompressor-venv: llmcompressor 0.14.0.1, transformers 5.17); it imports neither qtool nor
anything of the main environment. The bench (awq_bench.py) runs it as a measured child process
(wall time and peak RSS of the whole run: load, oneshot, save) and scores the compressed-tensors
folder it writes with the same code as qtool's rows (qtool's reader dequantizes it into the float32
transformers model).

    .cache/llmcompressor-venv/bin/python tests/bench/peer_llmcompressor.py \\
        MODEL_DIR CALIB.json OUT_DIR RESULT.json --bits 4 --group-size 64

CALIB.json: {"input_ids": [[...], ...]}, the token windows (all of one length), given to `oneshot`
as an already tokenized dataset, in order (no shuffling), every window used.

Recipe: AWQModifier with its defaults (the model's built-in Llama mappings q/k/v <- input norm,
o <- v, gate/up <- post-attention norm, down <- up; duo_scaling, 20-point grid) followed by a
QuantizationModifier on every Linear but lm_head (asymmetric int, group strategy, min/max observer),
as llm-compressor's AWQ examples do.

CPU workaround (see /work/shared/PEERS.md): before its grid search AWQ pins the cached block inputs
for faster host-to-device copies; `Tensor.pin_memory` needs an accelerator, so on a machine without
one the cache's `pin_memory` is replaced by a no-op (the values are on the CPU already, nothing else
changes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("calib", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("result", type=Path)
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, required=True)
    ap.add_argument("--symmetric", action="store_true", help="symmetric grid (default: asymmetric, AWQ's usual)")
    args = ap.parse_args()

    t_start = time.perf_counter()
    import torch
    from datasets import Dataset
    from llmcompressor import __version__ as llmc_version
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pinned_noop = not torch.accelerator.is_available()
    if pinned_noop:
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None

    windows = json.loads(args.calib.read_text())["input_ids"]
    seq_len = len(windows[0])
    ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(str(args.model))
    t_load = time.perf_counter() - t0

    weights = {"num_bits": args.bits, "type": "int", "symmetric": args.symmetric, "strategy": "group",
               "group_size": args.group_size}
    awq = AWQModifier(duo_scaling=True, n_grid=20)
    quant = QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                                 ignore=["lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=[awq, quant], num_calibration_samples=len(windows),
            max_seq_length=seq_len, shuffle_calibration_samples=False)
    t_oneshot = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(str(args.out), save_compressed=True)
    tok.save_pretrained(str(args.out))
    t_save = time.perf_counter() - t0

    result = {
        "peer": "llm-compressor", "version": llmc_version, "torch": torch.__version__,
        "config": {"awq": {"duo_scaling": awq.duo_scaling, "n_grid": awq.n_grid}, "weights": weights, "ignore": ["lm_head"]},
        "calibration": {"samples": len(windows), "seq_len": seq_len},
        "pin_memory_noop": pinned_noop,
        "load_s": t_load, "oneshot_s": t_oneshot, "save_s": t_save, "run_s": time.perf_counter() - t_start,
        "torch_threads": torch.get_num_threads(),
    }
    args.result.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
