"""Runs inside the isolated aqlm venv ($QTOOL_CACHE/aqlm-venv: transformers 5.23 + aqlm[cpu] 1.1.7),
not the project's: load qtool's `-f aqlm` folders with stock transformers `from_pretrained` on CPU
in float32 (aqlm's numba kernel for 2^8-entry codebooks takes float32 only) and save what they compute.

usage: python aqlm_consumer.py OUT.pt FOLDER...
OUT.pt: {folder: {"logits", "ids", "kernels", "weights", "loading_info"}}:
  kernels   {module: "QuantizedLinear/<kernel function>"} for every aqlm module
  weights   {module: the [out, in] weight the module computes with, measured as its output on the
            identity through the module's own forward kernel, minus its bias}"""

import sys

import torch
from transformers import AutoModelForCausalLM

results = {}
for folder in sys.argv[2:]:
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    model.eval()
    from aqlm import QuantizedLinear
    from aqlm.inference_kernels import get_forward_pass_kernel  # what the module's gemm path runs

    ids = torch.arange(3, 3 + 24).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        logits = model(ids).logits[0].float()
        kernels, weights = {}, {}
        for name, m in model.named_modules():
            if isinstance(m, QuantizedLinear):
                eye = torch.eye(m.in_features)  # 7+ rows: the batched (gemm) kernel path
                y = m(eye)
                if m.bias is not None:
                    y = y - m.bias
                weights[name] = y.t().contiguous()
                kernels[name] = f"QuantizedLinear/{get_forward_pass_kernel(m.codebooks, True).__name__}"
    results[folder] = {"logits": logits, "ids": ids, "kernels": kernels, "weights": weights,
                       "loading_info": {k: sorted(v) if isinstance(v, (list, set)) else v for k, v in info.items()
                                        if k in ("missing_keys", "unexpected_keys", "mismatched_keys")}}
torch.save(results, sys.argv[1])
