"""Peak memory and time of a planned run (`--dry-run`), term by term; the models are in
qtool/estimate.py. Every figure says how it was obtained (`time_how`, `memory_terms`)."""

from __future__ import annotations

import functools
import math
import time

import torch

from qtool import estimate as est
from qtool.config import QuantRecipe
from qtool.methods import METHODS
from qtool.model.source import CheckpointSource


def estimate_resources(report, source: CheckpointSource, recipe: QuantRecipe, writers) -> None:
    planned = [r for r in report.runs if r.refusal is None or r.refusal.stage == "output"]
    if not planned or all(r.output_bytes is None for r in planned):
        return
    method_cls = METHODS.get(recipe.method)
    blockwise = method_cls.needs_calibration and not (recipe.stats and hasattr(method_cls, "quantize_with_stats"))
    terms = _block_memory(source, recipe, method_cls, planned) if blockwise else _stream_memory(source)
    report.memory_terms = {"interpreter with torch and transformers (measured now)": est.resident_bytes(), **terms}
    report.peak_memory_bytes = sum(report.memory_terms.values())
    _time(report, source, recipe, method_cls, blockwise, planned, writers)


# -- memory ----------------------------------------------------------------------------------------
def _stream_memory(source: CheckpointSource) -> dict[str, int]:
    big = max(source.tensors(), key=lambda m: m.numel)
    return est.streaming_terms(big.numel, big.numel * big.dtype.itemsize)


def _hidden_size(source: CheckpointSource) -> int:
    from qtool.formats.gguf.metadata import text_config

    cfg = text_config(source.config)
    h = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model")
    return int(h) if isinstance(h, int) and h > 0 else max(m.shape[-1] for m in source.tensors() if len(m.shape) == 2)


def _blocks(source: CheckpointSource) -> dict[str, list]:
    by: dict[str, list] = {}
    for m in source.tensors():
        b = source.block_of(m.name)
        if b is not None:
            by.setdefault(b, []).append(m)
    return by


def _block_memory(source: CheckpointSource, recipe: QuantRecipe, method_cls, planned) -> dict[str, int]:
    from qtool.engine.activations import choose_storage, stores_alive
    from qtool.engine.block_engine import PROBE_TOKENS

    specs = planned[0].specs
    blocks = _blocks(source)
    if not blocks:
        return {}
    metas = max(blocks.values(), key=lambda ms: sum(m.numel for m in ms))
    quantized = [m for m in metas if m.name in specs]
    samples, seq = (1, PROBE_TOKENS) if recipe.stats else (recipe.samples, recipe.seq_len)
    shape = (1, seq, _hidden_size(source))
    stores = stores_alive(method_cls)
    on_disk = choose_storage(samples, shape, stores) == "disk"
    embed = max((m for m in source.tensors() if source.block_of(m.name) is None and len(m.shape) == 2),
                key=lambda m: m.numel, default=None)
    terms = est.block_terms(block_params=sum(m.numel for m in metas), block_bytes=sum(m.numel * m.dtype.itemsize for m in metas),
                            quantized=sum(m.numel for m in quantized), embed_params=embed.numel if embed else 0,
                            embed_bytes=embed.numel * embed.dtype.itemsize if embed else 0,
                            activations=0 if on_disk else samples * math.prod(shape) * 4, stores=stores,
                            hessians=max((m.shape[1] ** 2 * (8 + 4) for m in quantized), default=0))
    return {k: v for k, v in terms.items() if v}


# -- time ------------------------------------------------------------------------------------------
def _time(report, source: CheckpointSource, recipe: QuantRecipe, method_cls, blockwise: bool, planned, writers) -> None:
    speeds = est.machine_speeds()
    out_bytes = sum(r.output_bytes or 0 for r in planned)
    io = (report.input_bytes + out_bytes) / est.DISK_BPS + report.input_bytes / speeds.sha256
    how = [speeds.describe(), "reading and writing the files, hashing the inputs for the provenance record"]
    compute = 0.0
    metas = {m.name: m for m in source.tensors()}
    if blockwise:
        flops = _calibration_flops(source, recipe, planned[0].specs, metas)
        if flops is None:
            report.time_how = f"no time model for --method {recipe.method}; " + "; ".join(how)
            return
        compute += flops / speeds.flops
        how.append(f"{recipe.method}: {flops / 1e12:.2f} TFLOP of block forwards, Hessians and updates on "
                   f"{recipe.samples} x {recipe.seq_len} calibration tokens")
        if recipe.method == "gptq":
            compute += sum(est.gptq_layer_overhead(recipe.method_params, spec, metas[n].shape[1])
                           for n, spec in planned[0].specs.items())
            how.append("GPTQ's column loop timed on a probe per layer width")
    for r, w in zip(report.runs, writers):
        if r not in planned:
            continue
        compute += r.setup_seconds
        if r.setup_seconds > 0.05:
            how.append("the writers' setup (GGUF metadata and tokenizer) timed in the scratch run")
        if w.self_quantizing:
            compute += sum(math.prod(e.shape) / _gguf_rate(e.qtype) for e in w.entries if e.const is None)
            how.append("GGUF block encoding timed per type on a probe matrix")
        elif not blockwise:
            for name, spec in r.specs.items():
                m = metas[name]
                compute += m.numel / est.rounding_rate(recipe.method, recipe.method_params, spec, m.shape[1], m.dtype)
            how.append(f"{recipe.method} rounding timed on a probe weight per layer shape")
    report.seconds = io + compute
    report.time_how = "; ".join(dict.fromkeys(how)) + "; not counted: interpreter start, downloads"


def _calibration_flops(source: CheckpointSource, recipe: QuantRecipe, specs: dict, metas: dict) -> float | None:
    from qtool.engine.block_engine import PROBE_TOKENS

    blocks = _blocks(source)
    linear = [metas[n] for n in specs]
    per_block = sum(m.numel for m in linear) / max(len(blocks), 1)
    tokens = PROBE_TOKENS if recipe.stats else recipe.samples * recipe.seq_len
    params = {**recipe.method_params, "_seq_len": recipe.seq_len}
    return est.calibration_flops(recipe.method, params, tokens=tokens, block_linear_params=int(per_block),
                                 blocks=len(blocks), widths=[tuple(m.shape) for m in linear])


@functools.cache
def _gguf_rate(qtype) -> float:
    """Elements per second the GGUF encoder does for `qtype` (a 16 x 4096 probe, once per process)."""
    from qtool.formats.gguf.writer import encode

    x = torch.randn(16, 4096, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    encode(x, qtype)
    return x.numel() / max(time.perf_counter() - t0, 1e-6)
