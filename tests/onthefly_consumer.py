"""Runs inside the isolated consumer venv (.cache/hqq-quanto-quark-venv: hqq 0.2.8, optimum-quanto
0.2.7, amd-quark 0.13, transformers 5.23), not the project's: load qtool outputs with each
format's own runtime, save what the loaded model computes; and run hqq's quantizer itself.

usage: python onthefly_consumer.py OUT.pt JOB...      (one process for all jobs: imports cost seconds)
  JOB = hqq:FOLDER | quanto:FOLDER | quark:FOLDER      -> {"logits", "ids", "modules", "weights", ...}
      | hqq-quantize:IN.pt   IN.pt = {"w": [out, in] float32, "cases": [(nbits, group_size), ...]}
                             -> {(nbits, group_size): {"W_q", "scale", "zero"}} from hqq's Quantizer
                             with BaseQuantizeConfig(nbits, group_size)'s weight settings
      | quanto-quantize:IN.pt  IN.pt = {"w": [out, in] (its dtype kept)}
                             -> {"qint8" | "qfloat8_e4m3fn": {"data", "scale"}} from a quanto QLinear
OUT.pt: {JOB: result}. Logits in float32 for the ids 3..26 (mod vocab)."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

DTYPE = torch.float32
QUANT_MODULES = ("HQQLinear", "QLinear", "QParamsLinear")


def load_hqq(folder):
    from hqq.models.hf.base import AutoHQQHFModel

    return AutoHQQHFModel.from_quantized(folder, compute_dtype=DTYPE, device="cpu")


def load_quanto(folder):
    from optimum.quanto import QuantizedModelForCausalLM

    return QuantizedModelForCausalLM.from_pretrained(folder)._wrapped


def load_quark(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPE, device_map="cpu")


def run_model(kind, folder):
    model = {"hqq": load_hqq, "quanto": load_quanto, "quark": load_quark}[kind](folder).eval()
    ids = torch.arange(3, 3 + 24).reshape(1, -1) % model.config.vocab_size
    dtype = model.get_input_embeddings().weight.dtype
    weights = {}
    with torch.no_grad():
        logits = model(ids).logits[0].float()
        # each quantized module's weight as its runtime computes with it: the module applied to the
        # identity (every output is one weight times 1) with its bias zeroed, transposed to [out, in]
        for n, m in model.named_modules():
            if type(m).__name__ in QUANT_MODULES:
                bias = m.bias.clone() if getattr(m, "bias", None) is not None else None
                if bias is not None:
                    m.bias.zero_()
                weights[n] = m(torch.eye(m.in_features, dtype=dtype)).float().T.contiguous()
                if bias is not None:
                    m.bias.copy_(bias)
    modules = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.split(".")[0] in ("hqq", "optimum", "quark")})
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    return {"logits": logits, "ids": ids, "modules": modules, "meta_params": meta, "weights": weights, "dtype": str(dtype)}


def hqq_quantize(path):
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    job = torch.load(path)
    out = {}
    for nbits, g in job["cases"]:
        params = BaseQuantizeConfig(nbits=nbits, group_size=g)["weight_quant_params"]  # axis 1, round_zero at 4 bits
        W_q, meta = Quantizer.quantize(job["w"], **params, bitpack=False, device="cpu")
        out[(nbits, g)] = {"W_q": W_q.float(), "scale": meta["scale"].float(), "zero": meta["zero"].float()}
    return out


def quanto_quantize(path):
    import optimum.quanto as oq
    from optimum.quanto.nn import QLinear

    w = torch.load(path)["w"]
    out = {}
    for qname in ("qint8", "qfloat8_e4m3fn"):
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
        lin.weight.data.copy_(w)
        q = QLinear.from_module(lin, weights=getattr(oq, qname))
        q.freeze()
        out[qname] = {"data": q.weight._data.clone(), "scale": q.weight._scale.clone()}
    return out


results = {}
for job in sys.argv[2:]:
    kind, _, arg = job.partition(":")
    quantizers = {"hqq-quantize": hqq_quantize, "quanto-quantize": quanto_quantize}
    results[job] = quantizers[kind](arg) if kind in quantizers else run_model(kind, arg)
    print(job, results[job].get("modules", ""), flush=True)
torch.save(results, sys.argv[1])
