"""AQLM checkpoints (`-f aqlm`, `quant_method: aqlm`), as transformers loads them with the `aqlm`
package (its `QuantizedLinear`), from `-m aqlm`'s CodebookWeights (core/codebook.py):
  `prefix.codes`      [out, in / in_group, M]  int16 (B = 9..16) / int8 (B <= 8): the unsigned code
                                               stored as its two's complement (aqlm's pack_int_data)
  `prefix.codebooks`  float16 [M, 2^B, 1, in_group]  (out_group_size 1)
  `prefix.scales`     float16 [out, 1, 1, 1]
  `prefix.bias`       as in the checkpoint
config.json `quantization_config`: in_group_size, out_group_size 1, num_codebooks, nbits_per_codebook,
and `linear_weights_not_to_quantize` listing every Linear left in full precision BY MODULE NAME
(`lm_head`, `model.embed_tokens`): transformers 5.23 matches these as module-name prefixes, so
`lm_head.weight` would not protect lm_head (it is built as an AQLM layer with no codes: NaN logits).
transformers converts every other Linear with the one config, so one scheme per model.

Runtimes (tests/test_aqlm_format.py, aqlm 1.1.7 on CPU): 1x16 goes through aqlm's pure-torch
dequantize-then-matmul; 2^8-entry codebooks through a numba kernel that needs float32 and races on
its output vector when numba runs more than one thread (`NUMBA_NUM_THREADS=1`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from qtool.config import QuantRecipe
from qtool.core.codebook import CodebookWeight
from qtool.errors import FormatError, UnsupportedError
from qtool.formats import FORMATS
from qtool.formats.base import GroupChoice
from qtool.formats.hf_quantized import HFQuantizedWriter, group_modules, load_folder, register_reader

PARTS = ("codes", "codebooks", "scales")


def code_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits <= 8 else torch.int16


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes -> aqlm's storage: values >= 2^(B-1) minus 2^B, in int8 / int16."""
    c = codes.to(torch.int32)
    return torch.where(c >= 2 ** (bits - 1), c - 2**bits, c).to(code_dtype(bits))


def unpack_codes(stored: torch.Tensor, bits: int) -> torch.Tensor:
    return (stored.to(torch.int32) % (2**bits)).to(torch.int32)


def codebook_bits_per_weight(shapes: dict[str, tuple[int, int]], M: int, B: int, g: int) -> float:
    """What the fp16 codebooks add, in bits per quantized weight over these layers (M x 2^B x g values
    per layer), on top of the codes' M x B / g."""
    weights = sum(o * i for o, i in shapes.values())
    return len(shapes) * M * 2**B * g * 16 / weights if weights else 0.0


def codebook_overhead_note(shapes: dict[str, tuple[int, int]], M: int, B: int, g: int) -> str | None:
    """Said when the codebooks cost more than half the codes' bits (1x16 on a small model: 65,536 x 8
    fp16 values per layer are ~16.6 bits per weight on SmolLM2-135M's 576-wide layers), else None."""
    extra, codes = codebook_bits_per_weight(shapes, M, B, g), M * B / g
    if extra <= codes / 2:
        return None
    small = min(shapes.values(), key=lambda s: s[0] * s[1])
    return (f"the {M}x{B} codebooks ({M} x {2**B:,} x {g} fp16 values per layer) add {extra:.2f} bits per weight to the "
            f"codes' {codes:.2f} over these layers (smallest {small[0]} x {small[1]}): a scheme for wider layers; "
            f"2x8 would add {codebook_bits_per_weight(shapes, 2, 8, g):.2f}")


@FORMATS.register("aqlm")
class AQLMWriter(HFQuantizedWriter):
    """AQLM additive codebooks (transformers + the aqlm package; CPU and GPU kernels); from -m aqlm only."""

    qtype_kinds = ("int",)

    def check_recipe(self, recipe: QuantRecipe) -> None:
        if recipe.method != "aqlm":
            raise UnsupportedError(f"--format aqlm holds additive codebooks: use -m aqlm, not -m {recipe.method}")
        if recipe.target_bpw is not None or recipe.target_size is not None:
            raise UnsupportedError("--format aqlm: one codebook scheme per model (transformers builds every layer with "
                                   "the one config); --target-bpw / --target-size do not apply")

    def _params(self, recipe: QuantRecipe) -> dict:
        from qtool.methods.params import resolve

        return resolve("aqlm", recipe.method_params)

    def choose_layouts(self, shapes: dict[str, tuple[int, int]], recipe: QuantRecipe) -> dict[str, GroupChoice]:
        """Every layer's width must be a multiple of --in-group (refused, naming the layer and the
        group sizes that would divide every width)."""
        params = self._params(recipe)
        g = params["in_group"]
        bad = {m: s[1] for m, s in shapes.items() if s[1] % g}
        if bad:
            layer, width = next(iter(bad.items()))
            common = [d for d in (1, 2, 4, 8, 16, 32) if all(s[1] % d == 0 for s in shapes.values())]
            hint = f"--in-group values that divide every width: {', '.join(map(str, common))}" if common else \
                "no group size divides every width; leave this layer out with --ignore"
            raise UnsupportedError(f"layer {layer}: input width {width} is not a multiple of --in-group {g}; {hint}")
        note = codebook_overhead_note(shapes, params["codebooks"], params["codebook_bits"], g)
        return {m: GroupChoice("codebook", g, note) for m in shapes}

    def spec_options(self, recipe: QuantRecipe) -> dict:
        """The codebook scheme, so that sizes known before the run (--dry-run) count codes and codebooks."""
        params = self._params(recipe)
        return {"codebook": (params["codebooks"], params["codebook_bits"])}

    def begin(self, out: Path, source, recipe: QuantRecipe | None) -> None:
        super().begin(out, source, recipe)
        self.scheme: tuple[int, int, int] | None = None  # (M, B, in_group) of the layers written

    def pack(self, prefix: str, qw: CodebookWeight) -> dict[str, torch.Tensor]:
        if not isinstance(qw, CodebookWeight):
            raise UnsupportedError(f"{prefix}.weight: --format aqlm holds additive codebooks (-m aqlm)")
        scheme = (qw.num_codebooks, qw.bits, qw.in_group)
        if self.scheme is not None and scheme != self.scheme:
            raise UnsupportedError(f"{prefix}.weight: codebook scheme {scheme} differs from the model's {self.scheme}")
        self.scheme = scheme
        M, K, g = qw.codebooks.shape
        return {f"{prefix}.codes": pack_codes(qw.codes.cpu(), qw.bits).contiguous(),
                f"{prefix}.codebooks": qw.codebooks.cpu().to(torch.float16).reshape(M, K, 1, g).contiguous(),
                f"{prefix}.scales": qw.scales.cpu().to(torch.float16).reshape(-1, 1, 1, 1).contiguous()}

    def not_converted(self) -> list[str]:
        keep = super().not_converted()
        embeds = [t.name[: -len(".weight")] for t in self.source.tensors()
                  if t.name.endswith(".weight") and "embed" in t.name[: -len(".weight")].rsplit(".", 1)[-1]]
        return keep + [e for e in embeds if e not in keep]

    def quantization_config(self) -> dict:
        M, B, g = self.scheme or (1, 16, 8)
        return {"quant_method": "aqlm", "in_group_size": g, "out_group_size": 1, "num_codebooks": M,
                "nbits_per_codebook": B, "linear_weights_not_to_quantize": self.not_converted()}


def read_quantized(folder: Path, config: dict | None = None) -> tuple[dict[str, CodebookWeight], dict[str, torch.Tensor]]:
    """An AQLM folder -> ({module: CodebookWeight}, {name: other tensor})."""
    import json

    config = config if config is not None else json.loads((folder / "config.json").read_text())
    q = config.get("quantization_config") or {}
    B, g, og = q.get("nbits_per_codebook"), q.get("in_group_size"), q.get("out_group_size", 1)
    if not isinstance(B, int) or not isinstance(g, int) or og != 1:
        raise FormatError(f"{folder}/config.json: aqlm quantization_config with nbits_per_codebook {B!r}, in_group_size "
                          f"{g!r}, out_group_size {og!r}: qtool reads out_group_size 1 with integer sizes")
    tensors, _ = load_folder(folder)
    modules, rest = group_modules(tensors, PARTS)
    qws = {}
    for prefix, t in modules.items():
        if set(t) != set(PARTS):
            raise FormatError(f"{folder}: {prefix}: aqlm module without {', '.join(sorted(set(PARTS) - set(t)))}")
        cb = t["codebooks"]
        if cb.dim() != 4 or cb.shape[2] != 1 or cb.shape[3] != g or cb.shape[1] != 2**B:
            raise FormatError(f"{folder}: {prefix}.codebooks shape {list(cb.shape)} is not [M, 2^{B}, 1, {g}]")
        codes = unpack_codes(t["codes"], B)
        if codes.dim() != 3 or codes.shape[-1] != cb.shape[0]:
            raise FormatError(f"{folder}: {prefix}.codes shape {list(codes.shape)} does not match {cb.shape[0]} codebooks")
        qws[prefix] = CodebookWeight(codes, cb.reshape(cb.shape[0], cb.shape[1], g), t["scales"].reshape(-1), g, B)
    return qws, rest


register_reader("aqlm", read_quantized)
