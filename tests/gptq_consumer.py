"""Runs inside an isolated consumer venv, not the project's (.cache/gptq-venv: transformers +
optimum + gptqmodel (+ auto-round); .cache/otf-venv: transformers + bitsandbytes + torchao): load
folders with stock transformers `from_pretrained`, save what the loaded model computes.

usage: python gptq_consumer.py OUT.pt [--gptqmodel] FOLDER...   (one process for all folders: imports cost ~5 s)
--gptqmodel: load with GPTQModel's own `GPTQModel.load` (torch kernel) instead of transformers'
from_pretrained: the loader that reads GPTQModel's per-layer `dynamic` widths.
OUT.pt: {folder: {"logits", "ids", "kernels", "weights", "linears", "loading_info", "dtype"}}, in
bfloat16 (or what the loader forces: auto-round's float16):
  kernels       class names of the quantized modules (and of torchao's weight tensor subclasses)
  weights       {quantized module: the [out, in] weight its kernel computes with}
  linears       the same for every Linear-shaped module, quantized or not
  loading_info  transformers' load report: missing / unexpected / mismatched keys
  dtype         what the model computed in"""

import os
import sys

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # 2-core machine; see /work/shared/PEERS.md
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText  # noqa: E402

DTYPE = torch.bfloat16


def is_quantized(m: torch.nn.Module) -> bool:
    """A quantized kernel module (GPTQ's qweight, bitsandbytes' Linear4bit/8bitLt, FP8Linear...) or
    a Linear whose weight is a tensor subclass (torchao)."""
    if hasattr(m, "qweight"):
        return True
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or not hasattr(m, "in_features"):
        return False
    # a Linear subclass with float weights (SigLIP's NonDynamicallyQuantizableLinear) is not quantized
    return type(w.data) is not torch.Tensor or w.dtype not in (torch.bfloat16, torch.float16, torch.float32)


def kernel_name(m: torch.nn.Module) -> str:
    w = getattr(m, "weight", None)  # gptqmodel's modules hold a metadata object there, not a tensor
    sub = type(w.data).__name__ if isinstance(w, torch.Tensor) and type(w.data) is not torch.Tensor else None
    return f"{type(m).__name__}[{sub}]" if sub else type(m).__name__


def in_features(m: torch.nn.Module) -> int | None:
    return getattr(m, "in_features", None) or getattr(m, "infeatures", None)  # auto-round's QuantLinear: infeatures


def computed_weight(m: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The module applied to the identity (every output is one weight times 1) with its bias
    zeroed, transposed to [out, in]: the weight as its kernel computes with it."""
    bias = getattr(m, "bias", None)
    saved = bias.detach().clone() if bias is not None else None
    if bias is not None:
        bias.data.zero_()
    w = m(torch.eye(in_features(m), dtype=dtype)).float().T.contiguous()
    if bias is not None:
        bias.data.copy_(saved)
    return w


def load(folder: str):
    if NATIVE:
        from gptqmodel import BACKEND, GPTQModel

        return GPTQModel.load(folder, device="cpu", backend=BACKEND.TORCH, dtype=DTYPE).model, {}
    arch = (AutoConfig.from_pretrained(folder).architectures or [""])[0]
    auto = AutoModelForImageTextToText if arch.endswith("ForConditionalGeneration") else AutoModelForCausalLM
    return auto.from_pretrained(folder, dtype=DTYPE, device_map="cpu", output_loading_info=True)


NATIVE = sys.argv[2:3] == ["--gptqmodel"]
results = {}
for folder in sys.argv[3 if NATIVE else 2:]:
    model, info = load(folder)
    ids = torch.arange(3, 3 + 24).reshape(1, -1) % model.get_input_embeddings().num_embeddings
    quantized = {n for n, m in model.named_modules() if is_quantized(m)}
    kernels = sorted({kernel_name(m) for n, m in model.named_modules() if n in quantized})
    weights, linears = {}, {}
    with torch.no_grad():
        logits = model(ids).logits[0].float()
        for n, m in model.named_modules():
            if in_features(m) and (hasattr(m, "weight") or hasattr(m, "qweight")):
                linears[n] = computed_weight(m, model.dtype)
                if n in quantized:
                    weights[n] = linears[n]
    info = {k: sorted(map(str, v)) for k, v in info.items() if isinstance(v, (list, set, tuple))}
    results[folder] = {"logits": logits, "ids": ids, "kernels": kernels, "weights": weights, "linears": linears,
                       "loading_info": info, "dtype": str(model.dtype)}
    print(folder, kernels, flush=True)
torch.save(results, sys.argv[1])
