"""Additive codebook weights (AQLM; Egiazarian et al., "Extreme Compression of Large Language Models
via Additive Quantization", ICML 2024, §3): the unpacked object `-m aqlm` returns and `-f aqlm` writes.

A weight W [out, in] is cut into groups of `in_group` consecutive input columns; each group of row o
is the sum of M codebook vectors, one per codebook, times the row's scale:

    W[o, j·g:(j+1)·g] = scales[o] · Σ_m codebooks[m, codes[o, j, m]]

Codes are held unsigned (int32, values in [0, 2^B)); the writer stores them in the aqlm package's
two's-complement int8 / int16 (formats/aqlm.py). Codebooks and scales are held in the dtype they are
stored in (float16), so `dequantize()` is exactly what a loader reconstructs, up to summation order.

Also here: the k-means used to initialise codebooks (§3.1, residual k-means on the scaled groups),
in pure torch with chunked distances (1x16 codebooks have 65,536 entries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CodebookWeight:
    codes: torch.Tensor  # [out, in / in_group, M] int32, unsigned code values
    codebooks: torch.Tensor  # [M, 2^bits, in_group]
    scales: torch.Tensor  # [out]
    in_group: int
    bits: int  # per codebook

    # what the pipeline reads of any quantized weight
    strategy = "codebook"
    zero_point = None
    g_idx = None
    float_zeros = False
    symmetric = True

    @property
    def num_codebooks(self) -> int:
        return int(self.codes.shape[-1])

    @property
    def scheme(self) -> str:
        """AQLM's name for the layout: "1x16", "2x8" (codebooks x bits per codebook)."""
        return f"{self.num_codebooks}x{self.bits}"

    @property
    def group_size(self) -> int:
        return self.in_group

    @property
    def scale(self) -> torch.Tensor:
        return self.scales

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]) * self.in_group)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Reference reconstruction in float32 (codebook vectors summed, then scaled per row)."""
        return reconstruct(self.codes, self.codebooks.float(), self.scales.float()).to(dtype or self.scales.dtype)

    def storage_bits(self) -> int:
        """Codes (bits each) + codebooks + scales, as stored."""
        return (self.codes.numel() * self.bits + self.codebooks.numel() * self.codebooks.element_size() * 8
                + self.scales.numel() * self.scales.element_size() * 8)

    def cpu(self) -> "CodebookWeight":
        return CodebookWeight(self.codes.cpu(), self.codebooks.cpu(), self.scales.cpu(), self.in_group, self.bits)


def reconstruct(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[out, G, M] codes, [M, K, g] codebooks, [out] scales -> [out, G·g] weight (differentiable in
    codebooks and scales)."""
    import torch.nn.functional as F

    out, G, M = codes.shape
    idx = codes.long()
    v = F.embedding(idx[..., 0], codebooks[0])  # embedding's backward is a dense scatter-add, far faster than indexing's
    for m in range(1, M):
        v = v + F.embedding(idx[..., m], codebooks[m])
    return v.reshape(out, -1) * scales.unsqueeze(1)


def nearest(x: torch.Tensor, c: torch.Tensor, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Index of the nearest row of `c` [K, d] for each row of `x` [N, d] (squared Euclidean), in
    chunks of rows so that at most `chunk_elems` distances exist at once."""
    cc = (c * c).sum(1)
    rows = max(1, chunk_elems // max(1, c.shape[0]))
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for i in range(0, x.shape[0], rows):
        xs = x[i:i + rows]
        out[i:i + rows] = torch.addmm(cc.unsqueeze(0), xs, c.t(), alpha=-2).argmin(1)
    return out


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of the rows of `x` [N, d] into `k` centroids -> (centroids [k, d], assignment [N]).
    Initialised from distinct random rows (with k > N, every row once and the rest drawn again with
    a small jitter); an emptied cluster keeps its centroid."""
    n, d = x.shape
    if k <= n:
        c = x[torch.randperm(n, generator=generator)[:k]].clone()
    else:
        extra = x[torch.randint(n, (k - n,), generator=generator)]
        jitter = torch.randn(extra.shape, generator=generator) * (x.std() * 1e-2 + 1e-8)
        c = torch.cat([x, extra + jitter.to(x.device)])
    for _ in range(iters):
        a = nearest(x, c)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        counts = torch.bincount(a, minlength=k).to(x.dtype)
        full = counts > 0
        c[full] = sums[full] / counts[full].unsqueeze(1)
    return c, nearest(x, c)


def residual_kmeans(groups: torch.Tensor, num_codebooks: int, k: int, iters: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook m is k-means of what codebooks 0..m-1 leave unexplained (§3.1 initialisation):
    `groups` [N, g] -> (codebooks [M, k, g], codes [N, M])."""
    residual = groups.clone()
    books, codes = [], []
    for _ in range(num_codebooks):
        c, a = kmeans(residual, k, iters, generator)
        residual -= c[a]
        books.append(c)
        codes.append(a)
    return torch.stack(books), torch.stack(codes, 1)
