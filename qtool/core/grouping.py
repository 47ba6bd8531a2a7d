"""Group layout: which scale column each input column uses. A partial last group is allowed here;
formats that cannot hold one say so (see formats/base.py)."""

from __future__ import annotations


import torch


def column_groups(
    in_features: int,
    strategy: str,
    group_size: int | None,
    g_idx: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    if g_idx is not None:
        return g_idx.long()
    if strategy == "group":
        return torch.arange(in_features, device=device) // group_size
    return torch.zeros(in_features, dtype=torch.long, device=device)


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group_size], zero-padding a partial last group.

    Zero padding never changes a group's range: the affine grid always contains 0."""
    out, cols = w.shape
    pad = (-cols) % group_size
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out, -1, group_size)


def divisors_for_groups(in_features: int, up_to: int | None = None) -> list[int]:
    """Power-of-two group sizes (>= 16) that divide `in_features`: what to suggest to a user."""
    out = []
    g = 16
    while g <= (up_to or in_features) and g <= in_features:
        if in_features % g == 0:
            out.append(g)
        g *= 2
    return out
