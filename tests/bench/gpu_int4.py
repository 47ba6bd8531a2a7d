"""GPU bench: the W4 g128 quantized linear (qtool.kernels.cuda) at batch 1 against the
memory-bandwidth bound, and at 512 rows against a dense bf16 matmul. Runs only where CUDA is
present (`python tests/bench/gpu_int4.py --out results.json`); prints one line per case.

Bytes counted per call: the packed weight + scales (+ zeros) + activations in and out. The
bound is those bytes over the device-to-device copy bandwidth measured here (read + write)."""

from __future__ import annotations

import argparse
import json
import sys

import torch


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read and written."""
    from triton.testing import do_bench

    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=5, rep=50)
    return 2 * a.numel() / (ms * 1e-3)


def make_weight(n: int, k: int, group: int, asym: bool):
    from qtool.kernels.int4 import Int4Weight

    g = torch.Generator(device="cuda").manual_seed(0)
    packed = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda", generator=g)
    scale = (torch.rand(n, k // group, device="cuda", generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
    zero = torch.randint(-8, 8, (n, k // group), dtype=torch.int8, device="cuda", generator=g) if asym else None
    return Int4Weight(packed, scale, zero, group, k)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    from triton.testing import do_bench

    from qtool.kernels import cuda
    from qtool.kernels.int4 import dequantize_reference

    if not cuda.available():
        print("no CUDA GPU / triton: skipped")
        return 0
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    bw = copy_bandwidth()
    results["copy_bandwidth_GBps"] = bw / 1e9
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    shapes = [(16384, 16384), (4096, 14336), (14336, 4096)] if not args.quick else [(8192, 8192)]
    rows = []
    for n, k in shapes:
        w = make_weight(n, k, 128, asym=False)
        wbytes = w.nbytes()
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        bound_ms = (wbytes + 2 * (k + n)) / bw * 1e3
        best = None
        for bn in (8, 16, 32, 64):
            for bkw in (16, 32, 64, 128):
                try:
                    ms = do_bench(lambda: cuda.linear(x, w, block_n=bn, block_kw=bkw), warmup=10, rep=50)
                except Exception as e:  # a config that does not compile: skip it, say so
                    print(f"  config {bn}x{bkw}: {type(e).__name__}", flush=True)
                    continue
                if best is None or ms < best[0]:
                    best = (ms, bn, bkw)
        ms_default = do_bench(lambda: cuda.linear(x, w), warmup=10, rep=50)
        dense = dequantize_reference(w, torch.bfloat16)
        ms_dense = do_bench(lambda: torch.nn.functional.linear(x, dense), warmup=10, rep=50)
        x512 = torch.randn(512, k, device="cuda", dtype=torch.bfloat16)
        ms_gemm = do_bench(lambda: cuda.linear(x512, w), warmup=5, rep=30)
        ms_dense512 = do_bench(lambda: torch.nn.functional.linear(x512, dense), warmup=5, rep=30)
        row = {"n": n, "k": k, "weight_MB": wbytes / 1e6, "bound_ms": bound_ms, "gemv_best_ms": best[0],
               "gemv_best_cfg": best[1:], "gemv_default_ms": ms_default,
               "gemv_fraction_of_bound": bound_ms / best[0], "dense_bf16_gemv_ms": ms_dense,
               "gemm512_ms": ms_gemm, "dense_bf16_gemm512_ms": ms_dense512,
               "gemm512_TFLOPs": 2 * 512 * n * k / (ms_gemm * 1e-3) / 1e12}
        del dense
        rows.append(row)
        print(json.dumps(row), flush=True)
    results["rows"] = rows
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
