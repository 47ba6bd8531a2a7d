"""Runs inside an isolated consumer venv (otf-venv: transformers + bitsandbytes + torchao;
hqq-quanto-quark-venv: hqq + optimum-quanto), with PYTHONPATH = the repository so that the scoring
code is qtool.evaluate.perplexity, the same as every other bench row. One job per process.

    python otf_score.py RESULT.json WINDOWS.pt JOB [--batch-size 4]
JOB = base:MODEL_DIR                   the bf16 model as it is
    | file:KIND:FOLDER                 qtool's folder loaded by its consumer (KIND: hf | hqq | quanto)
    | peer:METHOD:MODEL_DIR:OUT_DIR    the peer library quantizing MODEL_DIR itself (METHOD in PEERS),
                                       saving to OUT_DIR with its own serializer, then scored in memory

Timing of a peer: `import_s` (its libraries, from process start), `quantize_s` (from_pretrained with
the quantization config, or load + the library's quantize call), `save_s`; `total_s` is their sum,
the span a `qtool quantize` process covers (imports, load, quantize, write). `peak_rss_bytes`: this
process's VmHWM after saving (before scoring). All models compute in bfloat16 (the checkpoint's dtype).
quanto's CPU int4 matmul is slow: its QLinears are swapped for dense Linears holding quanto's own
dequantized weights (the same numbers) on both sides, file and peer.
"""

import time

T0 = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections import Counter  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

DTYPE = torch.bfloat16


def vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for p in ("torch", "transformers", "bitsandbytes", "torchao", "hqq", "optimum-quanto", "accelerate"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


def module_kinds(model) -> dict:
    """Counts of the quantized Linear classes (with their weight's class) the model computes with."""
    c = Counter()
    for m in model.modules():
        name = type(m).__name__
        if name in ("Linear4bit", "Linear8bitLt", "HQQLinear", "QLinear", "FP8Linear") or (
                name == "Linear" and type(getattr(m, "weight", None)).__name__ not in ("Parameter", "Tensor")):
            c[f"{name}[{type(m.weight).__name__}]" if hasattr(m, "weight") and name != "HQQLinear" else name] += 1
    return dict(c)


def densify_quanto(model) -> int:
    from optimum.quanto.nn import QLinear

    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QLinear):
                dense = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, dtype=DTYPE)
                with torch.no_grad():
                    dense.weight.copy_(child.qweight.dequantize().to(DTYPE))
                    if child.bias is not None:
                        dense.bias.copy_(child.bias.to(DTYPE))
                setattr(parent, name, dense)
                n += 1
    return n


# -- loaders of qtool's files ------------------------------------------------------------------------
def load_file(kind: str, folder: str):
    if kind == "hf":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPE, device_map="cpu")
    if kind == "hqq":
        from hqq.models.hf.base import AutoHQQHFModel

        return AutoHQQHFModel.from_quantized(folder, compute_dtype=DTYPE, device="cpu")
    if kind == "quanto":
        from optimum.quanto import QuantizedModelForCausalLM

        return QuantizedModelForCausalLM.from_pretrained(folder)._wrapped
    raise SystemExit(f"unknown file kind {kind}")


# -- the peers ---------------------------------------------------------------------------------------
def _bnb(**kw):
    from transformers import BitsAndBytesConfig

    if kw.get("load_in_4bit"):
        kw.setdefault("bnb_4bit_compute_dtype", DTYPE)
    return BitsAndBytesConfig(**kw)


def _ao(kind: str, group: int | None = None):
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup
    from transformers import TorchAoConfig

    cfg = {"int8": lambda: Int8WeightOnlyConfig(), "fp8": lambda: Float8WeightOnlyConfig(),
           "int4": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group))}[kind]()
    return TorchAoConfig(quant_type=cfg)


def _fp8():
    from transformers import FineGrainedFP8Config

    return FineGrainedFP8Config()


# METHOD -> (description, how): "hf" = transformers from_pretrained(quantization_config=...)
PEERS = {
    "bnb-nf4": ("BitsAndBytesConfig(load_in_4bit, nf4, blocksize 64)", lambda: _bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
    "bnb-fp4": ("BitsAndBytesConfig(load_in_4bit, fp4, blocksize 64)", lambda: _bnb(load_in_4bit=True, bnb_4bit_quant_type="fp4")),
    "bnb-nf4-dq": ("BitsAndBytesConfig(load_in_4bit, nf4, bnb_4bit_use_double_quant)",
                   lambda: _bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)),
    "bnb-int8": ("BitsAndBytesConfig(load_in_8bit) (LLM.int8)", lambda: _bnb(load_in_8bit=True)),
    "ao-int8": ("TorchAoConfig(Int8WeightOnlyConfig())", lambda: _ao("int8")),
    "ao-int4-g32": ("TorchAoConfig(IntxWeightOnlyConfig(int4, PerGroup(32)))", lambda: _ao("int4", 32)),
    "ao-int4-g64": ("TorchAoConfig(IntxWeightOnlyConfig(int4, PerGroup(64)))", lambda: _ao("int4", 64)),
    "ao-int4-g128": ("TorchAoConfig(IntxWeightOnlyConfig(int4, PerGroup(128)))", lambda: _ao("int4", 128)),
    "ao-fp8": ("TorchAoConfig(Float8WeightOnlyConfig())", lambda: _ao("fp8")),
    "fp8": ("FineGrainedFP8Config() (128 x 128 blocks)", _fp8),
    "hqq-4-g64": ("hqq AutoHQQHFModel.quantize_model(BaseQuantizeConfig(nbits=4, group_size=64))", None),
    "hqq-3-g64": ("hqq AutoHQQHFModel.quantize_model(BaseQuantizeConfig(nbits=3, group_size=64))", None),
    "hqq-2-g64": ("hqq AutoHQQHFModel.quantize_model(BaseQuantizeConfig(nbits=2, group_size=64))", None),
    "quanto-int4": ("optimum-quanto QuantizedModelForCausalLM.quantize(weights=qint4, exclude=lm_head)", None),
    "quanto-int8": ("optimum-quanto QuantizedModelForCausalLM.quantize(weights=qint8, exclude=lm_head)", None),
}


def run_peer(method: str, src: str, out: str, r: dict):
    from transformers import AutoModelForCausalLM

    desc, make_cfg = PEERS[method]
    r["peer"] = desc
    if method.startswith("hqq"):
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel
    elif method.startswith("quanto"):
        import optimum.quanto as oq
        from optimum.quanto import QuantizedModelForCausalLM
    else:
        import bitsandbytes  # noqa: F401 - part of the import time either way
        import torchao  # noqa: F401
    t1 = time.perf_counter()
    r["import_s"] = round(t1 - T0, 2)
    if make_cfg is not None:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=DTYPE, device_map="cpu", quantization_config=make_cfg())
    else:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=DTYPE)
        if method.startswith("hqq"):
            bits, g = int(method.split("-")[1]), int(method.split("-g")[1])
            AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits=bits, group_size=g), compute_dtype=DTYPE, device="cpu")
        else:
            qm = QuantizedModelForCausalLM.quantize(model, weights=getattr(oq, "qint" + method.split("int")[1]), exclude="lm_head")
    t2 = time.perf_counter()
    r["quantize_s"] = round(t2 - t1, 2)
    try:
        if method.startswith("hqq"):
            AutoHQQHFModel.save_quantized(model, out)
        elif method.startswith("quanto"):
            qm.save_pretrained(out)
        else:
            model.save_pretrained(out)
        r["save_s"] = round(time.perf_counter() - t2, 2)
    except Exception as e:  # noqa: BLE001 - the table says the peer could not save
        r["save_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        r["save_s"] = round(time.perf_counter() - t2, 2)
    r["total_s"] = round(r["import_s"] + r["quantize_s"] + r["save_s"], 2)
    r["peak_rss_bytes"] = vm_hwm()
    return qm._wrapped if method.startswith("quanto") else model


def main() -> None:
    from qtool.evaluate import perplexity

    result_path, windows_path, job = sys.argv[1:4]
    batch = int(sys.argv[sys.argv.index("--batch-size") + 1]) if "--batch-size" in sys.argv else 4
    kind, _, rest = job.partition(":")
    r: dict = {"job": job, "versions": versions()}
    try:
        if kind == "base":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(rest, dtype=DTYPE)
        elif kind == "file":
            fkind, _, folder = rest.partition(":")
            t = time.perf_counter()
            model = load_file(fkind, folder)
            r["load_s"] = round(time.perf_counter() - t, 2)
        elif kind == "peer":
            method, src, out = rest.split(":")
            model = run_peer(method, src, out, r)
        else:
            raise SystemExit(f"unknown job {job}")
        r["modules"] = module_kinds(model)
        if any(k.startswith("QLinear") for k in r["modules"]):
            r["densified_qlinears"] = densify_quanto(model)
        windows = torch.load(windows_path)
        r.update(perplexity(model.eval(), windows, batch).to_dict())
    except Exception as e:  # noqa: BLE001 - one line for the table
        lines = [l for l in str(e).splitlines() if l.strip()]
        r["error"] = f"{type(e).__name__}: {lines[0] if lines else ''}"[:400]
    r["process_s"] = round(time.perf_counter() - T0, 2)
    with open(result_path, "w") as f:
        json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
