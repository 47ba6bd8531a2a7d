"""MSE-optimal grid ranges: instead of a group's min/max, the shrunken range r·[min, max] (r on a
grid from 1 down to 1 - max_shrink) whose round-to-nearest error Σ |w - ŵ|^norm over the group is
least. GPTQModel's `mse` option searches the same way (norm 2.4, 100 steps, shrink up to 0.8);
values outside the shrunken range are clipped to it by the rounding's clamp."""

from __future__ import annotations

import torch

from qtool.core.affine import int_qparams
from qtool.qtypes import QType


def mse_qparams(groups: torch.Tensor, qtype: QType, symmetric: bool, scale_dtype: torch.dtype, *,
                steps: int = 100, max_shrink: float = 0.8, norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """groups [.., G, k] -> (scale [.., G], zero [.., G] or None), as core/affine.int_qparams returns them."""
    lo, hi = groups.amin(-1, keepdim=True).clamp(max=0), groups.amax(-1, keepdim=True).clamp(min=0)
    best_s, best_z = int_qparams(groups, qtype, symmetric, scale_dtype)
    best = _error(groups, best_s, best_z, qtype, norm)
    for i in range(1, int(max_shrink * steps)):
        r = 1 - i / steps
        s, z = int_qparams(torch.maximum(torch.minimum(groups, hi * r), lo * r), qtype, symmetric, scale_dtype)
        err = _error(groups, s, z, qtype, norm)
        better = err < best
        best = torch.where(better, err, best)
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


def _error(groups: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, qtype: QType, norm: float) -> torch.Tensor:
    sf = s.to(groups.dtype).unsqueeze(-1)
    q = groups / sf
    if z is not None:
        zf = z.to(groups.dtype).unsqueeze(-1)
        w = ((q + zf).round().clamp(qtype.qmin, qtype.qmax) - zf) * sf
    else:
        w = q.round().clamp(qtype.qmin, qtype.qmax) * sf
    return (groups - w).abs().pow(norm).sum(-1)
