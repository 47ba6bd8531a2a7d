"""Estimates for `qtool quantize --dry-run`, from tensor shapes and the plan alone.

* bits of a quantized layer: what the run's report counts (QuantizedWeight.storage_bits: codes +
  scales + zero points), from the LayerSpec: exact for the integer, float8 and table types;
* bytes on disk per format: the packed tensors as each writer lays them out (int32 words of
  packed codes, fp16 GPTQ/AWQ scales, GPTQ's g_idx...), the unquantized tensors at their dtype,
  a safetensors header entry per tensor and the small files (config, tokenizer, card);
* peak memory: this process's resident memory now (the interpreter with torch and transformers
  imported: what a run starts from) plus the largest working set of the run's phase, term by term
  (`memory_terms`);
* time: operation counts of the run (weights rounded, forward passes over the calibration tokens,
  Hessian products, GPTQ updates) divided by throughputs measured here on small probes (a float32
  matmul, the method's rounding on a probe weight, sha256); reading and writing at DISK_BPS, an
  assumption. Downloads, interpreter start and the Hub are not counted.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from dataclasses import dataclass

import torch

from qtool.methods.base import LayerSpec

DISK_BPS = 500e6  # assumed sequential read / write speed (bytes per second)
SMALL_FILES = 16 * 1024  # config.json, qtool.json, the model card: a few kB each
ST_ENTRY = 96  # bytes of safetensors header JSON per tensor, about


# -- bits and bytes ------------------------------------------------------------------------------
def n_scales(shape: tuple[int, int], spec: LayerSpec) -> int:
    out, cols = shape
    if spec.strategy == "tensor":
        return 1
    if spec.strategy == "block":
        r, c = spec.block  # type: ignore[misc]
        return -(-out // r) * -(-cols // c)
    if spec.strategy == "group":
        return out * -(-cols // spec.group_size)  # type: ignore[operator]
    return out


def scale_bits(spec: LayerSpec, dtype: torch.dtype) -> int:
    if spec.qtype.kind == "lut":
        return 32  # blockwise absmax in float32
    return torch.tensor([], dtype=spec.scale_dtype or dtype).element_size() * 8


def layer_bits(shape: tuple[int, int], spec: LayerSpec, dtype: torch.dtype) -> int:
    """QuantizedWeight.storage_bits of this layer once quantized (what the run report sums)."""
    out, cols = shape
    if spec.strategy == "codebook" and spec.codebook is not None:  # core/codebook.py: codes, fp16 codebooks and scales
        M, B = spec.codebook
        g = spec.group_size or 1
        return out * (cols // g) * M * B + M * 2**B * g * 16 + out * 16
    n = n_scales(shape, spec)
    bits = out * cols * spec.qtype.bits
    if spec.double_quant:  # 8-bit codes of the scales, blocks of 256 with a float32 absmax, a 256-entry table, an offset
        bits += n * 8 + (-(-n // 256) + 256 + 1) * 32
    else:
        bits += n * scale_bits(spec, dtype)
    if not spec.symmetric and spec.qtype.kind == "int":
        bits += n * spec.qtype.bits
    return bits


def _words(n: int, bits: int) -> int:
    """Bytes of `n` codes of `bits` packed into int32 words."""
    return -(-n * bits // 32) * 4


def _gptq_bytes(shape, spec) -> int:
    out, cols = shape
    groups = -(-cols // spec.group_size) if spec.strategy == "group" else 1
    b = spec.qtype.bits
    return out * _words(cols, b) + groups * _words(out, b) + groups * out * 2 + cols * 4


def _awq_bytes(shape, spec) -> int:
    out, cols = shape
    groups = -(-cols // spec.group_size) if spec.strategy == "group" else 1
    return cols * _words(out, 4) + groups * _words(out, 4) + groups * out * 2


def _ct_bytes(shape, spec, dtype) -> int:
    out, cols = shape
    if spec.qtype.kind != "int":
        return layer_bits(shape, spec, dtype) // 8
    n = n_scales(shape, spec)
    zeros = (n // out) * _words(out, spec.qtype.bits) if not spec.symmetric else 0
    return out * _words(cols, spec.qtype.bits) + n * scale_bits(spec, dtype) // 8 + zeros + 16


def format_layer_bytes(fmt: str, shape: tuple[int, int], spec: LayerSpec, dtype: torch.dtype) -> int:
    """Bytes a format stores for one quantized layer (its packed layout; others: the report's bits)."""
    if fmt == "gptq" or (fmt == "auto-round" and spec.symmetric):
        return _gptq_bytes(shape, spec)
    if fmt == "awq" or fmt == "auto-round":
        return _awq_bytes(shape, spec)
    if fmt == "compressed-tensors":
        return _ct_bytes(shape, spec, dtype)
    if fmt == "aqlm" and spec.codebook is not None:  # codes stored as int8 (B <= 8) / int16 (formats/aqlm.py)
        M, B = spec.codebook
        g = spec.group_size or 1
        return shape[0] * (shape[1] // g) * M * (1 if B <= 8 else 2) + M * 2**B * g * 2 + shape[0] * 2
    return -(-layer_bits(shape, spec, dtype) // 8)


# -- time ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Speeds:
    """Throughputs measured here (once per process: `machine_speeds`)."""

    flops: float  # float32 matmul, flop/s
    sha256: float  # bytes/s

    def describe(self) -> str:
        return (f"measured here: float32 matmul {self.flops / 1e9:.1f} GFLOP/s, sha256 {self.sha256 / 1e6:.0f} MB/s; "
                f"disk {DISK_BPS / 1e6:.0f} MB/s assumed")


@functools.cache
def machine_speeds() -> Speeds:
    """A ~0.1 s probe of this machine, cached for the life of the process (the machine does not change)."""
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.05:
        a @ a
        n += 1
    flops = n * 2 * 256 ** 3 / (time.perf_counter() - t0)
    blob, k, t0 = os.urandom(1 << 20), 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.02:
        hashlib.sha256(blob).digest()
        k += 1
    return Speeds(flops, k * len(blob) / (time.perf_counter() - t0))


def rounding_rate(method_name: str, params: dict, spec: LayerSpec, cols: int, dtype: torch.dtype) -> float:
    """Weights per second the method rounds at, timed on a probe weight of `cols` columns (<= 4096),
    about 64k weights; once per process for each method, layout and width."""
    cols = min(cols, 4096)
    if spec.strategy == "group":
        cols = max(spec.group_size, cols - cols % spec.group_size)  # type: ignore[operator]
    return _rate(method_name, tuple(sorted(params.items())), spec.qtype.name, spec.strategy, spec.group_size,
                 spec.symmetric, spec.scale_dtype, spec.block, spec.double_quant, cols, dtype)


@functools.cache
def _rate(method_name, params, qtype, strategy, group_size, symmetric, scale_dtype, block, double_quant, cols, dtype) -> float:
    from qtool.methods import METHODS
    from qtool.qtypes import get_qtype

    method = METHODS.get(method_name)(**dict(params))
    rows = max(1, min(256, (1 << 16) // cols))
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).to(dtype)
    probe = LayerSpec("probe", get_qtype(qtype), strategy, group_size, symmetric, scale_dtype,
                      (1, block[1]) if block else None, double_quant)
    t0 = time.perf_counter()
    method.quantize(w, probe)
    return w.numel() / max(time.perf_counter() - t0, 1e-6)


def gptq_layer_overhead(params: dict, spec: LayerSpec, cols: int) -> float:
    """Seconds GPTQ's column loop spends on a layer of `cols` inputs beyond its arithmetic: timed on
    a 16-row probe of that width (the loop's cost per column is mostly Python and small-op
    overhead at these sizes; the flops of the full layer are counted separately)."""
    return _gptq_probe(tuple(sorted(params.items())), spec.qtype.name, spec.strategy, spec.group_size, spec.symmetric,
                       min(cols, 4096))


@functools.cache
def _gptq_probe(params, qtype, strategy, group_size, symmetric, cols) -> float:
    from qtool.methods import METHODS
    from qtool.qtypes import get_qtype

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, cols, generator=g)
    x = torch.randn(2 * cols, cols, generator=g)
    spec = LayerSpec("probe", get_qtype(qtype), strategy, group_size if strategy == "group" and cols % group_size == 0 else None,
                     symmetric)
    if spec.group_size is None and strategy == "group":
        spec = LayerSpec("probe", spec.qtype, "channel", None, symmetric)
    method = METHODS.get("gptq")(**dict(params))
    t0 = time.perf_counter()
    method.quantize_with_stats(w, spec, x.T @ x / x.shape[0])
    return time.perf_counter() - t0


def calibration_flops(method_name: str, params: dict, *, tokens: int, block_linear_params: int, blocks: int,
                      widths: list[tuple[int, int]]) -> float | None:
    """Floating-point operations of a calibration method over the whole model (None: no model for it).
    `widths`: (out, in) of every quantized linear; `block_linear_params`: weights of one block's linears."""
    forward = 2.0 * tokens * block_linear_params  # one pass of the calibration tokens through one block's linears
    if method_name == "gptq":
        hess = sum(2.0 * tokens * i * i for _, i in widths) / max(blocks, 1)  # Σ XᵀX, per block
        update = sum(2.0 * o * i * i + i ** 3 / 3 for o, i in widths) / max(blocks, 1)  # column loop + Cholesky
        return blocks * (3 * forward + hess + update)  # capture/inputs, one sequential pass per group, next inputs
    if method_name == "awq":
        grid = int(params.get("alpha_grid", 20)) + (int(params.get("clip_grid", 20)) if params.get("clip", True) else 0)
        return blocks * (2 + grid) * forward
    if method_name == "autoround":
        iters, batch = int(params.get("iters", 200)), int(params.get("batch_size", 8))
        samples = max(1, tokens // max(1, params.get("_seq_len", 1)))
        per_step = 3.0 * forward * min(batch, samples) / samples  # forward + backward on one batch
        return blocks * (3 * forward + iters * per_step)
    return None


# -- memory ----------------------------------------------------------------------------------------
def resident_bytes() -> int:
    """This process's resident memory now (Linux), else 0."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def streaming_terms(largest: int, largest_bytes: int) -> dict[str, int]:
    """Peak working set of a tensor-by-tensor run: the largest tensor as read, its float32 copy,
    its reconstruction (for the error figure) and its int8 codes."""
    return {"largest tensor as stored": largest_bytes, "its float32 copy and reconstruction": 8 * largest,
            "its codes": largest}


def block_terms(*, block_params: int, block_bytes: int, quantized: int, embed_params: int, embed_bytes: int,
                activations: int, stores: int, hessians: int) -> dict[str, int]:
    """Peak working set of a block-level calibration run (engine/block_engine.py), the larger of its
    two phases, plus the activation stores in RAM (alive in both): capturing block 0's inputs (the
    embedding as read, its mapped file pages and its float32 copy) or quantizing the largest block
    (float32, its checkpoint tensors as read and mapped, the codes, the largest Hessian while it is
    summed: a float64 sum plus each window's float32 XᵀX, engine/blockwise.HessianCollector)."""
    capture = {"capture phase: the embedding as read and mapped, and in float32": 2 * embed_bytes + 4 * embed_params}
    block = {"the largest block in float32": 4 * block_params,
             "its checkpoint tensors as read and mapped, and its codes": 2 * block_bytes + 2 * quantized,
             "the largest Hessian while summed (float64 sum + float32 product)": hessians}
    phase = capture if sum(capture.values()) > sum(block.values()) else block
    return {f"activations in RAM ({stores} stores of samples x seq_len x hidden, float32)": activations * stores, **phase}


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def seconds_text(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    return f"{s / 60:.0f} min" if s < 3600 else f"{s / 3600:.1f} h"


