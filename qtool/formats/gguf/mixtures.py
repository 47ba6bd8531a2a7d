"""llama.cpp's quantization mixtures: which GGML type each tensor gets for a `--type`.

A mixture (`Q4_K_M`, `Q3_K_S`...) is not one type: llama-quantize starts every quantizable tensor
at the mixture's default type and then bumps some of them by category and layer position, then
falls back to a 32-wide type where a row length is no multiple of the 256-wide K super-block.
This module restates those rules (llama.cpp `src/llama-quant.cpp`, the revision vendored in
llama-cpp-python 0.3.36: `llama_ftype_get_default_type`, `tensor_allows_quantization`,
`tensor_get_category`, `llama_tensor_get_type_impl`, `tensor_type_fallback`) as data plus one
small function, for the mixtures qtool writes. IQ mixtures are left out. With an importance matrix
(`--imatrix`, see imatrix.py) llama-quantize changes one rule for these mixtures: Q4_0 / Q5_0 give
ffn_down of the first eighth of the layers Q4_1 / Q5_1 (FFN_DOWN_IMATRIX_RULES, `has_imatrix`);
its other imatrix-dependent rules concern IQ mixtures only, and its refusal to quantize without an
imatrix concerns IQ types and Q2_K_S, none of which qtool writes.

The layer position of the attn_v rules is a running counter over tensors in the order
llama.cpp's loader holds them (`weight_name_comparer`: block number, then name), which is what
`plan_types` reproduces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

import gguf

T = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType
QK_K = 256


@dataclass(frozen=True)
class Mixture:
    name: str  # CLI spelling, as llama-quantize prints it
    ftype: FT  # written to general.file_type
    default: T  # llama_ftype_get_default_type()

    @property
    def quantized(self) -> bool:
        return self.default not in FLOAT_TYPES


FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16})

MIXTURES: dict[str, Mixture] = {
    m.name: m
    for m in (
        Mixture("F32", FT.ALL_F32, T.F32),
        Mixture("F16", FT.MOSTLY_F16, T.F16),
        Mixture("BF16", FT.MOSTLY_BF16, T.BF16),
        Mixture("Q8_0", FT.MOSTLY_Q8_0, T.Q8_0),
        Mixture("Q4_0", FT.MOSTLY_Q4_0, T.Q4_0),
        Mixture("Q4_1", FT.MOSTLY_Q4_1, T.Q4_1),
        Mixture("Q5_0", FT.MOSTLY_Q5_0, T.Q5_0),
        Mixture("Q5_1", FT.MOSTLY_Q5_1, T.Q5_1),
        Mixture("Q2_K", FT.MOSTLY_Q2_K, T.Q2_K),
        Mixture("Q3_K_S", FT.MOSTLY_Q3_K_S, T.Q3_K),
        Mixture("Q3_K_M", FT.MOSTLY_Q3_K_M, T.Q3_K),
        Mixture("Q3_K_L", FT.MOSTLY_Q3_K_L, T.Q3_K),
        Mixture("Q4_K_S", FT.MOSTLY_Q4_K_S, T.Q4_K),
        Mixture("Q4_K_M", FT.MOSTLY_Q4_K_M, T.Q4_K),
        Mixture("Q5_K_S", FT.MOSTLY_Q5_K_S, T.Q5_K),
        Mixture("Q5_K_M", FT.MOSTLY_Q5_K_M, T.Q5_K),
        Mixture("Q6_K", FT.MOSTLY_Q6_K, T.Q6_K),
    )
}
# llama-quantize's own aliases (tools/quantize: "Q3_K: alias for Q3_K_M", ...).
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "FP16": "F16", "FP32": "F32"}


def resolve(name: str) -> Mixture | None:
    key = name.strip().upper().replace("-", "_")
    return MIXTURES.get(ALIASES.get(key, key))


class Category(Enum):
    """`tensor_category` / `tensor_get_category`: broad roles, matched on GGUF names."""

    TOKEN_EMBD = "token_embd"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"  # attn_v, the fused attn_qkv and MLA's attn_kv_b (`category_is_attn_v`)
    ATTN_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OUTPUT = "output"
    OTHER = "other"


# (substring, category), first hit wins, in tensor_get_category's order.
_CATEGORY_SUBSTRINGS = (
    ("attn_qkv.weight", Category.ATTN_V),
    ("attn_kv_b.weight", Category.ATTN_V),  # GGUFs of older converters; ours split it (attn_k_b/v_b: OTHER)
    ("attn_v.weight", Category.ATTN_V),
    ("attn_k.weight", Category.ATTN_K),
    ("attn_q.weight", Category.ATTN_Q),
    ("attn_output.weight", Category.ATTN_OUTPUT),
    ("ffn_up", Category.FFN_UP),
    ("ffn_gate", Category.FFN_GATE),
    ("ffn_down", Category.FFN_DOWN),
)
# `tensor_allows_quantization`: substrings that keep a tensor in its converted type (ours are the
# ones our architectures can produce; the rest of llama.cpp's list names tensors they never have).
_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "position_embd", "token_types")


def category(name: str) -> Category:
    if name == "output.weight":
        return Category.OUTPUT
    if name == "token_embd.weight":
        return Category.TOKEN_EMBD
    for sub, cat in _CATEGORY_SUBSTRINGS:
        if sub in name:
            return cat
    return Category.OTHER


def ggml_n_dims(ne: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count ([576, 1] is 1-D)."""
    n = len(ne)
    while n > 1 and ne[n - 1] == 1:
        n -= 1
    return max(n, 1)


def allows_quantization(name: str, ne: tuple[int, ...]) -> bool:
    """llama-quantize touches only 2-D/3-D `*weight` tensors that are not norms or routers."""
    return ggml_n_dims(ne) >= 2 and name.endswith("weight") and not any(s in name for s in _NEVER_QUANTIZED)


# -- the per-category bumps of llama_tensor_get_type_impl, as data ---------------------------------


@dataclass(frozen=True)
class Rule:
    """`kind`: "always" -> `to`; "more_bits" -> `to` on layers where use_more_bits() holds;
    "below" -> `to` while the layer index < `bound` (a count, or n_layer // `bound` with
    `per_layers`), otherwise `otherwise` (None: unchanged); "gqa" -> `to` if n_head/n_head_kv >= 4
    else `otherwise`."""

    kind: str
    to: T
    otherwise: T | None = None
    bound: int = 0
    per_layers: bool = False


# attn_v (and attn_qkv): index = running count of attn_v-like tensors, n = their number.
ATTN_V_RULES = {
    "Q2_K": Rule("gqa", T.Q4_K, T.Q3_K),
    "Q3_K_M": Rule("below", T.Q5_K, T.Q4_K, bound=2),  # i_attention_wv < 2
    "Q3_K_L": Rule("always", T.Q5_K),
    "Q4_K_M": Rule("more_bits", T.Q6_K),
    "Q5_K_M": Rule("more_bits", T.Q6_K),
    "Q4_K_S": Rule("below", T.Q5_K, bound=4),  # i_attention_wv < 4
}
# ffn_down: index = layer (running counter; parsed from the name when n_expert > 1), n = n_layer.
FFN_DOWN_RULES = {
    "Q2_K": Rule("always", T.Q3_K),
    "Q3_K_M": Rule("below", T.Q5_K, T.Q4_K, bound=16, per_layers=True),  # non-falcon branch
    "Q3_K_L": Rule("always", T.Q5_K),
    "Q4_K_M": Rule("more_bits", T.Q6_K),
    "Q5_K_M": Rule("more_bits", T.Q6_K),
    "Q4_K_S": Rule("below", T.Q5_K, bound=8, per_layers=True),
}
# ffn_down, only when an imatrix is given (llama.cpp: "guard against craziness in the first few
# ffn_down layers ... for Q4_0/Q5_0"; without an imatrix the file stays as it always was).
FFN_DOWN_IMATRIX_RULES = {
    "Q4_0": Rule("below", T.Q4_1, bound=8, per_layers=True),
    "Q5_0": Rule("below", T.Q5_1, bound=8, per_layers=True),
}
ATTN_OUTPUT_RULES = {
    "Q2_K": Rule("always", T.Q3_K),
    "Q3_K_M": Rule("always", T.Q4_K),
    "Q3_K_L": Rule("always", T.Q5_K),
}
# models with exactly 8 experts (Mixtral): attn_output goes to Q5_K for these mixtures
ATTN_OUTPUT_8_EXPERTS = frozenset({"Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"})
# tensor_type_fallback: a 256-wide type on a row length that is no multiple of 256.
FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def use_more_bits(i: int, n: int) -> bool:
    """First and last eighth of the layers, and every third one in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _apply(rule: Rule | None, t: T, i: int, n: int, n_gqa: float) -> T:
    if rule is None:
        return t
    if rule.kind == "always":
        return rule.to
    if rule.kind == "more_bits":
        return rule.to if use_more_bits(i, n) else t
    if rule.kind == "gqa":
        return rule.to if n_gqa >= 4 else rule.otherwise  # type: ignore[return-value]
    bound = n // rule.bound if rule.per_layers else rule.bound
    return rule.to if i < bound else (rule.otherwise or t)


@dataclass(frozen=True)
class ModelFacts:
    """The hyper-parameters llama-quantize's rules look at."""

    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    is_70b: bool = False  # llama.cpp's LLM_TYPE_70B (80 layers: llama with GQA, qwen2)


@dataclass(frozen=True)
class TypeChoice:
    qtype: T
    note: str | None = None  # set when a fallback changed the type


_BLK = re.compile(r"^blk\.(\d+)\.")


def _layer(name: str) -> int:
    m = _BLK.match(name)
    return int(m.group(1)) if m else -1


def _fallback(t: T, ncols: int) -> TypeChoice:
    """tensor_type_fallback."""
    block = gguf.GGML_QUANT_SIZES[t][0]
    if ncols % block == 0:
        return TypeChoice(t)
    to = FALLBACK.get(t, t)
    if ncols % gguf.GGML_QUANT_SIZES[to][0]:
        to = T.F16  # not even a multiple of 32: llama.cpp keeps it in F16
    return TypeChoice(to, f"{ncols} columns not a multiple of {block}: {t.name} -> {to.name}")


def _choose(mix: Mixture, cat: Category, ncols: int, i: int, n: int, facts: ModelFacts, tied: bool,
            has_imatrix: bool = False) -> T:
    """llama_tensor_get_type_impl for the non-IQ mixtures."""
    t, name = mix.default, mix.name
    n_gqa = facts.n_head / max(facts.n_head_kv, 1)
    if cat == Category.OUTPUT or (tied and cat == Category.TOKEN_EMBD):
        # the output matrix (or the embeddings standing in for it) gets Q6_K, or Q8_0 where the
        # default type's block does not divide the row
        if ncols % gguf.GGML_QUANT_SIZES[t][0]:
            return T.Q8_0
        return t if t == T.Q8_0 else T.Q6_K
    if cat == Category.ATTN_V:
        t = _apply(ATTN_V_RULES.get(name), t, i, n, n_gqa)
        if facts.is_70b and t in (T.Q3_K, T.Q4_K):
            t = T.Q5_K
        return T.Q8_0 if facts.n_expert == 8 else t
    if cat == Category.ATTN_K:
        return T.Q8_0 if facts.n_expert == 8 else t
    if cat == Category.FFN_DOWN:
        rule = FFN_DOWN_RULES.get(name) or (FFN_DOWN_IMATRIX_RULES.get(name) if has_imatrix else None)
        return _apply(rule, t, i, n, n_gqa)
    if cat == Category.ATTN_OUTPUT:
        if facts.n_expert == 8:
            return T.Q5_K if name in ATTN_OUTPUT_8_EXPERTS else t
        return _apply(ATTN_OUTPUT_RULES.get(name), t, i, n, n_gqa)
    return t


@dataclass(frozen=True)
class TypeOverride:
    """One `--tensor-type PATTERN=TYPE` (llama-quantize's flag): the lower-cased pattern, searched
    (not matched) in each tensor name as std::regex_search does, and the type it forces."""

    pattern: str
    qtype: T

    def hits(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


def parse_override(text: str, writable: set[T]) -> TypeOverride:
    """`PATTERN=TYPE` -> TypeOverride, as tools/quantize parse_tensor_type: split at the first '=',
    the pattern lower-cased, the type name case-insensitive."""
    from qtool.errors import UnsupportedError, UsageError

    pattern, sep, tname = text.partition("=")
    if not sep or not pattern or not tname:
        raise UsageError(f"--tensor-type {text!r}: expected PATTERN=TYPE, e.g. attn_v=q8_0")
    pattern = pattern.lower()
    try:
        re.compile(pattern)
    except re.error as e:
        raise UsageError(f"--tensor-type {text!r}: not a regular expression ({e})") from None
    qtype = next((t for t in T if t.name.lower() == tname.strip().lower()), None)
    if qtype is None:
        raise UsageError(f"--tensor-type {text!r}: {tname!r} is no GGML type; qtool writes "
                         f"{', '.join(sorted(t.name for t in writable))}")
    if qtype not in writable:
        raise UnsupportedError(f"--tensor-type {text!r}: qtool does not write {qtype.name}; it writes "
                               f"{', '.join(sorted(t.name for t in writable))}")
    return TypeOverride(pattern, qtype)


def plan_types(
    tensors: dict[str, tuple[int, ...]], mix: Mixture, facts: ModelFacts, converted: dict[str, T],
    has_imatrix: bool = False, overrides: tuple[TypeOverride, ...] = (),
) -> dict[str, TypeChoice]:
    """GGUF name -> type, for every tensor. `tensors` maps GGUF names to GGML shapes (ne, fastest
    dimension first); `converted` holds the type each would have in convert_hf_to_gguf's output
    (what llama-quantize keeps for tensors it does not quantize); `has_imatrix`: an importance
    matrix with at least one entry is given (llama-quantize's `qs.has_imatrix`).

    `overrides` (--tensor-type), as llama_tensor_get_type applies them: for a quantized mixture,
    the first pattern found in a quantizable tensor's name sets its type and the mixture's rules
    are skipped for it, which also skips their running counters (an overridden attn_v does not
    advance the position the next attn_v's rule sees); the shape fallback still applies."""
    tied = "output.weight" not in tensors
    order = sorted(tensors, key=lambda s: (_layer(s), s))  # llama_model_loader's weights_map order
    n_attn_v = sum(category(s) == Category.ATTN_V for s in order)
    i_attn_v = i_ffn_down = 0
    out: dict[str, TypeChoice] = {}
    for name in order:
        ne = tensors[name]
        if not allows_quantization(name, ne):
            out[name] = TypeChoice(converted[name])
            continue
        if not mix.quantized:
            out[name] = TypeChoice(mix.default)
            continue
        manual = next((o.qtype for o in overrides if o.hits(name)), None)
        if manual is not None:
            out[name] = _fallback(manual, ne[0])
            continue
        cat = category(name)
        if cat == Category.ATTN_V:
            i, n = i_attn_v, n_attn_v
            i_attn_v += 1
        elif cat == Category.FFN_DOWN:
            i, n = (_layer(name) if facts.n_expert > 1 else i_ffn_down), facts.n_layer
            i_ffn_down += 1
        else:
            i, n = 0, facts.n_layer
        out[name] = _fallback(_choose(mix, cat, ne[0], i, n, facts, tied, has_imatrix), ne[0])
    return out
