"""Runs inside .cache/otf-venv (transformers + bitsandbytes + torchao), not the project's venv: the
libraries' OWN quantizers applied to a checkpoint's block linears, so that tests can hold qtool's
codes and scales equal to theirs.

usage: python otf_reference.py OUT.pt FOLDER
OUT.pt: {weight name: {"bnb:nf4" | "bnb:fp4" | "bnb:nf4-dq": {packed, absmax[, nested_absmax, offset]},
                       "ao:int8" | "ao:int4-g32" | "ao:int4-g64-asym" | "ao:fp8": {qdata, scale[, zero_point]}}}"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402
from torchao.quantization import (Float8WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig,  # noqa: E402
                                  PerGroup, quantize_)
from torchao.quantization.quant_primitives import MappingType  # noqa: E402

AO = {"ao:int8": Int8WeightOnlyConfig(), "ao:int4-g32": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
      "ao:int4-g64-asym": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64), mapping_type=MappingType.ASYMMETRIC),
      "ao:fp8": Float8WeightOnlyConfig()}

out = {}
with safe_open(os.path.join(sys.argv[2], "model.safetensors"), framework="pt") as f:
    for name in f.keys():
        if ".layers." not in name or not name.endswith("proj.weight"):
            continue
        w = f.get_tensor(name)
        r = {}
        for qt in ("nf4", "fp4"):
            packed, st = F.quantize_4bit(w, blocksize=64, quant_type=qt)
            r[f"bnb:{qt}"] = {"packed": packed, "absmax": st.absmax}
        packed, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        r["bnb:nf4-dq"] = {"packed": packed, "absmax": st.absmax, "nested_absmax": st.state2.absmax, "offset": st.offset}
        for key, cfg in AO.items():
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
            lin.weight.data.copy_(w)
            quantize_(lin, cfg)
            t = lin.weight
            r[key] = {k: getattr(t, k) for k in ("qdata", "scale", "zero_point") if getattr(t, k, None) is not None}
        out[name] = r
torch.save(out, sys.argv[1])
