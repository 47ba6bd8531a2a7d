"""Peer row: optimum-quanto data-free weight quantization, scored with qtool's perplexity code.

Runs in its own virtual environment (see `ensure_quanto_venv` in run_bench.py) that sees the main
environment's packages, so torch, transformers and `qtool.evaluate` are the same objects as in the
benchmark. quanto models are scored in memory after `freeze()` (its serialized checkpoints do not
reload with stock transformers, so there is no on-disk row for it). Its CPU int4 matmul is slow
(~10 s per 512-token window here), so for scoring each quantized Linear is swapped for a plain one
holding quanto's own dequantized weight: the same numbers, computed by a dense matmul.

    python tests/bench/peer_quanto.py MODEL_DIR TEXT_FILE RESULT.json --weights qint4|qint8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def densify(model: torch.nn.Module) -> int:
    """Replace every quanto QLinear by an nn.Linear holding its dequantized weight; returns how many."""
    from optimum.quanto.nn import QLinear

    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QLinear):
                dense = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    dense.weight.copy_(child.qweight.dequantize().float())
                    if child.bias is not None:
                        dense.bias.copy_(child.bias.float())
                setattr(parent, name, dense)
                count += 1
    return count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("text", type=Path)
    ap.add_argument("result", type=Path)
    ap.add_argument("--weights", choices=("qint4", "qint8"), required=True)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()

    import optimum.quanto as oq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtool.evaluate import eval_windows, perplexity

    tok = AutoTokenizer.from_pretrained(args.model)
    windows = eval_windows(tok, args.text, "eval", args.seq_len, args.windows)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    t0 = time.perf_counter()
    oq.quantize(model, weights=getattr(oq, args.weights), exclude=["lm_head"])
    oq.freeze(model)
    quantize_s = time.perf_counter() - t0
    swapped = densify(model)
    r = perplexity(model, windows, args.batch_size)
    args.result.write_text(json.dumps({
        "peer": "optimum-quanto", "version": oq.__version__ if hasattr(oq, "__version__") else None,
        "weights": args.weights, "quantize_s": quantize_s, "dense_swapped_linears": swapped, **r.to_dict(),
    }))


if __name__ == "__main__":
    main()
