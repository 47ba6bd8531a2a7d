"""Which GGUF tensors a Hugging Face checkpoint becomes, and how each is made from its sources:
the part of llama.cpp's `convert_hf_to_gguf.py` that renames and reshapes tensors (`filter_tensors`
and `modify_tensors` of the architecture's class, in the vendored llama-cpp-python 0.3.36 tree),
planned from tensor names and shapes alone.

What an entry can ask of its sources, in the order it is applied:
* stacking: per-expert matrices become one [n_expert, rows, cols] tensor (`sources` lists them);
* `transpose` of the last two dimensions (gpt-oss stores its fused experts input-major);
* `select` = (dim, start, stop, step): a slice of the source, to split fused gate/up experts
  (halves, or gpt-oss's interleaved rows) or to drop gemma3's out-of-vocabulary embedding rows;
* `transform`: the Q/K row permutation of llama-style RoPE, gemma's `norm + 1`, or the split of
  DeepSeek's MLA `kv_b_proj` into `attn_k_b` (transposed per head) and `attn_v_b`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from qtool.errors import FormatError, UnsupportedError
from qtool.formats.gguf import metadata as md
from qtool.model.source import CheckpointSource, TensorMeta, block_of

T = gguf.GGMLQuantizationType
A = gguf.MODEL_ARCH
# convert_hf_to_gguf keeps these in F32 whatever --outtype (prepare_tensors' list, our archs' part)
_ALWAYS_F32 = {gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP,
               gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES}
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")
_EXPERT = re.compile(r"^(?P<prefix>.*?(?:layers|h)\.\d+\.(?:mlp|block_sparse_moe))\.experts\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")
_FUSED_EXPERTS = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)(?P<bias>_bias)?(?:\.weight)?$")
# TextModel.filter_tensors: the tensors of a multimodal checkpoint's other towers (the text GGUF
# leaves them to the mmproj file)
_MM_PREFIXES = ("mlp", "vit.", "vpm.", "siglip2.", "conformer.", "merger.", "resampler.", "sound_encoder.",
                "sound_projection.", "speech_embeddings.")
_MM_PARTS = ("visual.", "vision.", "audio.", "talker.", "vision_", "audio_", "token2wav.", "code2wav.", "projector.",
             "pre_mm_projector_norm", "image_newline", "view_seperator", "patch_embed", "patch_embedding",
             "patch_merger.", "patch_merge_mlp.", "model.connector.")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class Entry:
    """One GGUF tensor: where its data comes from and what it becomes."""

    name: str
    shape: tuple[int, ...]  # torch order
    sources: list[str]  # HF tensors stacked along dim 0 (experts), or one
    transform: tuple | None = None  # ("permute", n_head), ("plus_one", 0), ("kv_b", part, n_head, nope, v)
    select: tuple[int, int, int, int] | None = None  # (dim, start, stop, step) of the (transposed) source
    transpose: bool = False  # swap the source's last two dimensions first
    qtype: T = T.F32
    note: str | None = None
    converted: T = T.F32  # its type in convert_hf_to_gguf's 16-bit output
    data: dict[int, np.ndarray] = field(default_factory=dict)
    const: torch.Tensor | None = None  # generated tensors (rope_freqs, LongRoPE factors)
    importance: torch.Tensor | None = None  # the imatrix's column weights [n_mat, cols], if it has them

    @property
    def ne(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size

    @property
    def rows(self) -> tuple[int, int] | None:
        """The contiguous source rows this entry takes (None: all), when that is all it does to
        them besides the Q/K permutation: what a calibration method's codes can be routed through."""
        if self.select is None:
            return None
        dim, start, stop, step = self.select
        return (start, stop) if dim == -2 and step == 1 else None

    @property
    def takes_codes(self) -> bool:
        plain = self.select is None or self.rows is not None
        return plain and not self.transpose and (self.transform is None or self.transform[0] == "permute")

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """The source tensor (one expert's, for a stack) -> this entry's values."""
        if self.transpose:
            t = t.transpose(-1, -2)
        if self.select is not None:
            dim, start, stop, step = self.select
            index = [slice(None)] * t.dim()
            index[dim] = slice(start, stop, step)
            t = t[tuple(index)]
        if self.transform is None:
            return t
        kind = self.transform[0]
        if kind == "permute":
            return permute_qk_rows(t, self.transform[1])
        if kind == "plus_one":  # convert_hf_to_gguf adds the gemma norm offset in float32
            return t.float() + 1
        return split_kv_b(t, *self.transform[1:])


def permute_qk_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute` (the inverse of gguf_source.unpermute_qk_rows): per head,
    HF's rotate-half rows [x_0..x_{d/2-1}, y_0..] become GGML's interleaved pairs (x_0, y_0, ...)."""
    half = t.shape[0] // n_head // 2
    return t.reshape(n_head, 2, half, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def split_kv_b(t: torch.Tensor, part: str, n_head: int, nope: int, v: int) -> torch.Tensor:
    """DeepseekV2Model.modify_tensors: MLA's kv_b_proj [n_head * (nope + v), kv_lora] as llama.cpp's
    absorbed attention wants it: `k` -> attn_k_b [n_head, kv_lora, nope] (each head's K part,
    transposed), `v` -> attn_v_b [n_head, v, kv_lora]."""
    kv = t.reshape(n_head, nope + v, t.shape[-1])
    if part == "k":
        return kv[:, :nope].transpose(1, 2).contiguous()
    return kv[:, nope:].contiguous()


def merge_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """The inverse of split_kv_b: attn_k_b + attn_v_b -> kv_b_proj [n_head * (nope + v), kv_lora]."""
    kv = torch.cat([k_b.transpose(1, 2), v_b], dim=1)
    return kv.reshape(-1, kv.shape[-1])


def vocab_rows(folder: Path | None) -> int | None:
    """Gemma3Model.modify_tensors: the rows of embed_tokens the tokenizer covers (the converter drops
    the rest); None when the folder has no tokenizer (nothing dropped)."""
    if folder is None:
        return None
    if (folder / "tokenizer.model").is_file():
        return None  # _create_vocab_sentencepiece pads to vocab_size: every row is kept
    f = folder / "tokenizer.json"
    if not f.is_file():
        return None
    data = json.loads(f.read_text(encoding="utf-8"))
    return len(data["model"]["vocab"]) + len(data.get("added_tokens", []))


class _Planner:
    """HF tensor metas + config -> GGUF entries, mirroring convert_hf_to_gguf's modify_tensors."""

    def __init__(self, config: dict, spec: md.ArchSpec, base: T, folder: Path | None = None):
        self.config, self.spec, self.base, self.folder = md.text_config(config), spec, base, folder
        self.n_layer = self.config["num_hidden_layers"]
        self.names = gguf.get_tensor_name_map(spec.arch, self.n_layer)
        self.entries: dict[str, Entry] = {}
        self.skipped: set[str] = set()

    def _map(self, hf_name: str) -> tuple[gguf.MODEL_TENSOR, str]:
        hit = self.names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if hit is None:
            raise UnsupportedError(f"--format gguf: tensor {hf_name} has no llama.cpp name for {self.spec.name}")
        return hit

    def _entry(self, hf_name: str, shape: tuple[int, ...], source: str | None = None) -> Entry:
        kind, name = self._map(hf_name)
        e = self.entries.get(name) or Entry(name, tuple(shape), [])
        self.entries[name] = e
        if source is not None:
            e.sources = [source]
        if len(shape) <= 1 or name.endswith("_norm.weight") or kind in _ALWAYS_F32 or not name.endswith(".weight"):
            e.converted = T.F32
        else:
            e.converted = self.base
        if self.spec.permute_qk and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
            heads = self.config["num_attention_heads"] if kind == gguf.MODEL_TENSOR.ATTN_Q else md.n_kv_heads(self.config)
            e.transform = ("permute", heads)
        elif self.spec.norm_plus_one and hf_name.endswith("norm.weight"):
            e.transform = ("plus_one", 0)
        return e

    def _filter(self, name: str) -> str | None:
        """filter_tensors: the name convert_hf_to_gguf maps, or None for a tensor it drops."""
        if name.endswith(_SKIPPED_SUFFIXES) or (self.spec.skip_lm_head and name == "lm_head.weight"):
            return None
        if name.startswith(_MM_PREFIXES) or any(p in name for p in _MM_PARTS):
            return None
        name = name.replace("e_score_correction_bias", "e_score_correction.bias").replace("language_model.", "")
        if self.spec.arch == A.GPT_OSS and "sinks" in name:
            name += ".weight"
        if self.spec.arch == A.DEEPSEEK2:
            if self.config.get("tie_word_embeddings") and name in ("lm_head.weight", "model.lm_head.weight"):
                return None
            if (m := _LAYER.match(name)) and int(m.group(1)) >= self.n_layer:
                return None  # multi-token-prediction layers: not converted
        return name

    def add(self, m: TensorMeta) -> None:
        name = self._filter(m.name)
        if name is None:
            self.skipped.add(m.name)
            return
        if hit := _EXPERT.match(name):
            n_exp = int(md._first(self.config, *md.EXPERT_COUNT_KEYS))
            e = self._entry(f"{hit['prefix']}.experts.{hit['proj']}.weight", (n_exp, *m.shape))
            if not e.sources:
                e.sources = [""] * n_exp
            e.sources[int(hit["e"])] = m.name
            return
        if (hit := _FUSED_EXPERTS.match(name)) and len(m.shape) == (2 if hit["bias"] else 3):
            self._fused_experts(m, hit)
            return
        if self.spec.arch == A.DEEPSEEK2 and name.endswith("kv_b_proj.weight"):
            self._kv_b(m, name)
            return
        shape = m.shape
        e = self._entry(name, shape, m.name)
        if self.spec.arch == A.GEMMA3 and "embed_tokens.weight" in name:
            n = vocab_rows(self.folder)
            if n is not None and n < shape[0]:
                e.shape, e.select = (n, *shape[1:]), (-2, 0, n, 1)

    def _fused_experts(self, m: TensorMeta, hit: re.Match) -> None:
        """Experts held as one 3-D tensor per projection (transformers' fused layout; gpt-oss's own)."""
        prefix, bias = hit["prefix"], bool(hit["bias"])
        suffix = "bias" if bias else "weight"
        gpt_oss = self.spec.arch == A.GPT_OSS  # [E, in, out] weights; gate/up rows interleaved
        shape = m.shape if bias or not gpt_oss else (*m.shape[:-2], m.shape[-1], m.shape[-2])
        if hit["proj"] == "down_proj":
            e = self._entry(f"{prefix}.down_proj.{suffix}", shape, m.name)
            e.transpose = gpt_oss and not bias
            return
        dim = -1 if bias else -2
        half = shape[dim] // 2
        for i, proj in enumerate(("gate_proj", "up_proj")):
            part = (*shape[:dim], half) if bias else (*shape[:-2], half, shape[-1])
            e = self._entry(f"{prefix}.{proj}.{suffix}", part, m.name)
            e.transpose = gpt_oss and not bias
            e.select = (dim, i, None, 2) if gpt_oss else (dim, i * half, (i + 1) * half, 1)

    def _kv_b(self, m: TensorMeta, name: str) -> None:
        n_head = md.n_kv_heads(self.config)
        nope, v = self.config["qk_nope_head_dim"], self.config["v_head_dim"]
        if m.shape[0] != n_head * (nope + v):
            raise FormatError(f"--format gguf: {m.name} has {m.shape[0]} rows, not {n_head} heads x ({nope} + {v})")
        cols = m.shape[-1]
        for part, shape in (("k", (n_head, cols, nope)), ("v", (n_head, v, cols))):
            e = self._entry(name.replace("kv_b_proj", f"{part}_b_proj"), shape, m.name)
            e.transform = ("kv_b", part, n_head, nope, v)

    def check_complete(self) -> None:
        for e in self.entries.values():
            if "" in e.sources:
                missing = e.sources.index("")
                raise FormatError(f"--format gguf: {e.name}: expert {missing} is missing from the checkpoint")

    def generated(self) -> list[Entry]:
        """generate_extra_tensors: rope_freqs (llama3 RoPE scaling), LongRoPE's factors (phi3)."""
        out = []
        if (factors := md.llama3_rope_factors(self.config)) is not None:
            out.append(Entry("rope_freqs.weight", tuple(factors.shape), [], const=factors))
        if self.spec.arch == A.PHI3 and md.rope_parameters(self.config).get("long_factor"):
            _, long, short = md.longrope(self.config)
            out.append(Entry("rope_factors_long.weight", tuple(long.shape), [], const=long))
            out.append(Entry("rope_factors_short.weight", tuple(short.shape), [], const=short))
        return out


def _arrival_order(source: CheckpointSource) -> list[TensorMeta]:
    """The order the pipeline delivers tensors in: block by block, then the rest (stable)."""
    order = {b: i for i, b in enumerate(source.blocks())}
    return sorted(source.tensors(), key=lambda m: order.get(block_of(m.name) or "", len(order)))


def auto_type(metas: list[TensorMeta]) -> str:
    """convert_hf_to_gguf's `--outtype auto`: the first matrix's dtype if 16-bit, else F16."""
    first = next((m.dtype for m in metas if len(m.shape) >= 2), None)
    return "BF16" if first == torch.bfloat16 else "F16"
