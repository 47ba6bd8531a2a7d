"""Error metrics between a weight and its reconstruction."""

from __future__ import annotations

import math

import torch


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|w|^2 / |w - w_hat|^2). inf when exact."""
    w = w.float()
    noise = torch.linalg.vector_norm(w - w_hat.float()).item() ** 2  # one fused reduction each
    signal = torch.linalg.vector_norm(w).item() ** 2
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)
