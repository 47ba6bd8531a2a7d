"""Runs inside the isolated GPTQ venv (.cache/gptq-venv: transformers + optimum + gptqmodel), not
the project's: load GPTQ folders with stock transformers, save what the loaded model computes.

usage: python gptq_consumer.py OUT.pt FOLDER...   (one process for all folders: imports cost ~5 s)
OUT.pt: {folder: {"logits", "ids", "kernels", "weights", "dtype"}}, computed in bfloat16 (or what the
loader forces: auto-round's float16)."""

import os
import sys

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # 2-core machine; see /work/shared/PEERS.md
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText  # noqa: E402

DTYPE = torch.bfloat16
results = {}
for folder in sys.argv[2:]:
    arch = (AutoConfig.from_pretrained(folder).architectures or [""])[0]
    auto = AutoModelForImageTextToText if arch.endswith("ForConditionalGeneration") else AutoModelForCausalLM
    model = auto.from_pretrained(folder, dtype=DTYPE, device_map="cpu")
    ids = torch.arange(3, 3 + 24).reshape(1, -1) % model.get_input_embeddings().num_embeddings
    kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
    weights = {}
    with torch.no_grad():
        logits = model(ids).logits[0].float()
        # each quantized module's weight as its kernel computes with it: the module applied to the
        # identity (every output is one weight times 1) with its bias zeroed, transposed to [out, in]
        for n, m in model.named_modules():
            if hasattr(m, "qweight"):
                bias = m.bias.clone() if getattr(m, "bias", None) is not None else None
                if bias is not None:
                    m.bias.zero_()
                in_f = getattr(m, "in_features", None) or m.infeatures  # auto-round's QuantLinear: infeatures
                weights[n] = m(torch.eye(in_f, dtype=model.dtype)).float().T.contiguous()
                if bias is not None:
                    m.bias.copy_(bias)
    # "dtype": what the model computed in (auto-round forces float16 on some backends)
    results[folder] = {"logits": logits, "ids": ids, "kernels": kernels, "weights": weights, "dtype": str(model.dtype)}
    print(folder, kernels, flush=True)
torch.save(results, sys.argv[1])
