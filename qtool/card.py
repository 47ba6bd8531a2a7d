"""The model card (`README.md`) written into every quantized output folder: what was done, how to
load it, and, after `qtool quantize --eval`, what it cost in quality. Pure: report in, text out."""

from __future__ import annotations

import json
import math
import re

from qtool import __version__

LOADERS = {
    "compressed-tensors": ("transformers (with `compressed-tensors` installed), vLLM", ""),
    "gptq": ("transformers with `optimum` and `gptqmodel` installed (GPTQModel kernels)", ""),
    "safetensors": ("transformers", ""),
    "bitsandbytes": ("transformers with `bitsandbytes` (>= 0.48 runs on CPU too) and `accelerate` installed", ""),
    "torchao": ("transformers with `torchao==0.18` installed (CPU or GPU)", ""),
    "fp8": ("transformers (fine-grained FP8: FP8 kernels on GPUs of compute capability >= 8.9, dequantized to bf16 elsewhere)", ""),
    "fbgemm-fp8": ("transformers with `fbgemm-gpu-genai` on a CUDA GPU (no CPU runtime)", ""),
    "eetq": ("transformers with `kernels` on a CUDA GPU (it fetches kernels-community/quantization-eetq; no CPU runtime)", ""),
    "hqq": ("hqq (`pip install hqq`, 0.2.8) — not stock transformers, which finds no weights file here", ""),
    "quanto": ("optimum-quanto (`pip install optimum-quanto`, 0.2.7) — stock transformers would load it with random weights", ""),
    "quark": ("transformers with `amd-quark` installed (0.13)", ""),
    "aqlm": ("transformers with `aqlm` installed (`aqlm[cpu]==1.1.7` on CPU: load with `dtype=torch.float32`; 2x8 codebooks "
             "run a numba kernel, set `NUMBA_NUM_THREADS=1` (it races on more threads); `aqlm[gpu]` on CUDA)", ""),
}
# Formats whose runtime is not transformers' from_pretrained: the lines that load them.
USE_CODE = {
    "hqq": ["import torch", "from hqq.models.hf.base import AutoHQQHFModel", "from transformers import AutoTokenizer", "",
            'model = AutoHQQHFModel.from_quantized("{name}", compute_dtype=torch.float32, device="cpu")  # or float16 / "cuda"',
            'tokenizer = AutoTokenizer.from_pretrained("{name}")'],
    "quanto": ["from optimum.quanto import QuantizedModelForCausalLM", "from transformers import AutoTokenizer", "",
               'model = QuantizedModelForCausalLM.from_pretrained("{name}")',
               'tokenizer = AutoTokenizer.from_pretrained("{name}")'],
    "gptq-dynamic": ["from gptqmodel import GPTQModel", "", 'model = GPTQModel.load("{name}")  # device="cpu" / "cuda"',
                     "tokenizer = model.tokenizer"],
}


def _fmt(v: float | None, digits: int = 4) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _recipe_line(r: dict) -> str:
    if r.get("method") == "aqlm":
        p = r.get("method_params") or {}
        return f"aqlm · {p.get('codebooks')}x{p.get('codebook_bits')} additive codebooks · {p.get('in_group')} input columns per code"
    g = f"group {r['group_size']}" if r.get("group_size") else f"per {r.get('strategy')}"
    return f"{r['method']} · {r['qtype']} · {g} · {'symmetric' if r.get('symmetric') else 'asymmetric'}"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def is_hub_id(model: str) -> bool:
    """`org/name` that is not a local path: what the Hub accepts as `base_model` metadata."""
    from pathlib import Path

    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model)) and not Path(model).exists()


def model_card(report: dict, base_model: str) -> str:
    """`report`: RunReport.to_dict() (output_bytes may still be 0: sizes come from input/bpw)."""
    r = report.get("recipe") or {}
    name = report["output"].rstrip("/").rsplit("/", 1)[-1]
    fmt = report["format"]
    tags = ["qtool", "quantized", r.get("method", ""), fmt]
    front = ["---"] + ([f"base_model: {base_model}"] if is_hub_id(base_model) else []) + ["tags:"] + [f"- {t}" for t in tags if t] + ["---", ""]
    lines = [f"# {name}", "", f"`{base_model}` quantized with qtool {__version__}: {_recipe_line(r) if r else fmt}.", ""]
    rows = [("format", fmt + (f" ({report['format_type']})" if report.get("format_type") else "")),
            ("quantized", f"{len(report.get('layers', []))} layers, {report['params_quantized']:,} of {report['params_total']:,} parameters"),
            ("bits per weight", f"{report['bpw_quantized']:.3f} (quantized layers, scales and zero points included)"),
            ("weight error (SQNR)", f"mean {_fmt(report.get('sqnr_db_mean'), 2)} dB, worst {_fmt(report.get('sqnr_db_min'), 2)} dB"),
            ("input size", _size(report.get("input_bytes", 0)))]
    c = report.get("calibration")
    if c:
        src = f", statistics from `{c['stats_file']}`" if c.get("stats_file") else ""
        rows.append(("calibration", f"{c.get('spec')}: {c.get('samples')} × {c.get('seq_len')} tokens, seed {c.get('seed')}{src}"))
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    e = report.get("eval")
    if e:
        lines += ["## Quality", "",
                  f"`qtool eval` on `{e['dataset']}` ({e['part']} part, {e['windows']} windows × {e['seq_len']} tokens, "
                  f"{e['tokens_scored']:,} predictions), against `{base_model}`:", "",
                  "| perplexity | base perplexity | ratio | KL(base ‖ quantized), nats/token | top-1 agreement |",
                  "|---|---|---|---|---|",
                  f"| {_fmt(e['perplexity'])} | {_fmt(e.get('base_perplexity'))} | {_fmt(e.get('ppl_ratio'))} | "
                  f"{_fmt(e.get('kld_mean'), 6)} | {_fmt(100 * e['top1_agreement'], 2) + ' %' if e.get('top1_agreement') is not None else '—'} |", ""]
    loader, _ = LOADERS.get(fmt, ("transformers", ""))
    if fmt == "gptq" and any("GPTQModel `dynamic`" in n for n in report.get("notes", [])):  # per-layer widths
        fmt, loader = "gptq-dynamic", ("GPTQModel (`pip install gptqmodel`) or vLLM, which read its per-layer `dynamic` widths "
                                       "(transformers' from_pretrained does not)")
    code = [c.format(name=name) for c in USE_CODE[fmt]] if fmt in USE_CODE else [
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")']
    lines += ["## Use", "", f"Loads with {loader}:", "", "```python", *code, "```", ""]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    if r:
        lines += ["## Recipe", "", "```json", json.dumps(r, indent=2, sort_keys=True), "```", ""]
    return "\n".join(front + lines)
