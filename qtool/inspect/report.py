"""The report `qtool inspect` gives: per-tensor rows, layer kinds, totals, bits per weight and the
memory to run a model (weights + KV cache); shared by the safetensors and GGUF readers."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field


KV_BYTES_PER_ELEMENT = 2  # a 16-bit KV cache

# Layer kinds, in display order, with the name patterns (HF and GGUF spellings) that pick them.
# Checked in this order: a norm inside attention is a norm, `embed_out` is the output head.
KINDS = ("attention", "mlp", "moe", "embeddings", "norms", "output", "other")
KIND_LABELS = {"attention": "attention", "mlp": "MLP", "moe": "MoE experts", "embeddings": "embeddings",
               "norms": "norms", "output": "output/lm_head", "other": "other"}
_KIND_RULES = (
    ("norms", re.compile(r"norm|(^|\.)ln(_\w+)?\.")),
    ("output", re.compile(r"(^|\.)lm_head\.|^output\.|(^|\.)embed_out\.")),
    ("embeddings", re.compile(r"embed|(^|\.)(wte|wpe)\.|token_embd|position_embd")),
    ("moe", re.compile(r"experts?\.|_exps\.|_shexp\.|ffn_gate_inp|\.router\.|block_sparse_moe\.gate\.|\.mlp\.gate\.")),
    ("attention", re.compile(r"attn|attention")),
    ("mlp", re.compile(r"mlp|ffn|feed_forward|(^|\.)fc\d\.")),
)


def layer_kind(name: str) -> str:
    for kind, rx in _KIND_RULES:
        if rx.search(name):
            return kind
    return "other"


# -- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorReport:
    """One parameter tensor (for a quantized module: its weight, all parts together)."""

    name: str
    kind: str
    type: str  # "BF16", "int4 g32 sym", "fp8 channel", "Q8_0"
    shape: tuple[int, ...]  # logical shape
    params: int
    bytes: int  # stored bits of the weight: values + scales + zero points
    extra_bytes: int = 0  # bookkeeping beside it (weight_shape, g_idx, activation scales)
    quantized: bool = False

    @property
    def bits(self) -> float | None:
        return 8 * self.bytes / self.params if self.params else None

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape), "bits": self.bits}


@dataclass(frozen=True)
class KVCache:
    """KV cache size: sum over layers of kv_heads × (key_length + value_length) × ctx × batch."""

    layers: int
    kv_heads: int | list[int]  # per layer where the model varies it (GGUF arrays)
    key_length: int
    value_length: int
    ctx: int
    batch: int
    bytes_per_element: int = KV_BYTES_PER_ELEMENT

    @property
    def bytes(self) -> int:
        heads = sum(self.kv_heads) if isinstance(self.kv_heads, list) else self.layers * self.kv_heads
        return heads * (self.key_length + self.value_length) * self.ctx * self.batch * self.bytes_per_element


@dataclass
class InspectReport:
    source: str
    format: str  # "safetensors", "compressed-tensors", "gguf", or another quant_method
    format_detail: str | None  # dtype, compressed-tensors format, GGUF file type
    method: str  # "none", the qtool recipe's method, the GGUF file type, or "unknown"
    files: dict[str, int]  # weight file -> bytes
    tensors: list[TensorReport]
    ctx: int
    batch: int
    kv_cache: KVCache | None
    provenance: dict | None = None
    notes: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # GGUF: model and tokenizer summary
    architecture: dict = field(default_factory=dict)  # family and what qtool can do with it (structure.capabilities)

    @property
    def params(self) -> int:
        return sum(t.params for t in self.tensors)

    @property
    def params_quantized(self) -> int:
        return sum(t.params for t in self.tensors if t.quantized)

    @property
    def file_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def tensor_bytes(self) -> int:
        return sum(t.bytes + t.extra_bytes for t in self.tensors)

    @property
    def bpw_quantized(self) -> float | None:
        q = [t for t in self.tensors if t.quantized]
        return _bpw(q)

    @property
    def bpw_model(self) -> float | None:
        return _bpw(self.tensors)

    @property
    def memory_bytes(self) -> int | None:
        return None if self.kv_cache is None else self.tensor_bytes + self.kv_cache.bytes

    def groups(self) -> list[dict]:
        """Rows of the summary: one per (layer kind, type), kinds in display order."""
        buckets: dict[tuple[str, str], list[TensorReport]] = {}
        for t in self.tensors:
            buckets.setdefault((t.kind, t.type), []).append(t)
        rows = []
        for (kind, typ), ts in sorted(buckets.items(), key=lambda kv: (KINDS.index(kv[0][0]), kv[0][1])):
            shapes = Counter(t.shape for t in ts)
            rows.append({
                "kind": kind, "type": typ, "quantized": ts[0].quantized, "tensors": len(ts),
                "shapes": [{"shape": list(s), "count": n} for s, n in shapes.most_common()],
                "params": sum(t.params for t in ts), "bytes": sum(t.bytes + t.extra_bytes for t in ts),
                "bits": _bpw(ts),
            })
        return rows

    def to_dict(self) -> dict:
        kv = self.kv_cache
        return {
            "source": self.source, "format": self.format, "format_detail": self.format_detail,
            "method": self.method,
            "files": [{"name": n, "bytes": b} for n, b in self.files.items()],
            "groups": self.groups(),
            "totals": {
                "params": self.params, "params_quantized": self.params_quantized,
                "file_bytes": self.file_bytes, "tensor_bytes": self.tensor_bytes,
                "bpw_quantized": self.bpw_quantized, "bpw_model": self.bpw_model,
            },
            "memory": {
                "ctx": self.ctx, "batch": self.batch, "weights_bytes": self.tensor_bytes,
                "kv_cache_bytes": kv.bytes if kv else None, "total_bytes": self.memory_bytes,
                "kv_cache": {k: v for k, v in asdict(kv).items() if k not in ("ctx", "batch")} if kv else None,
            },
            "provenance": self.provenance,
            "metadata": self.metadata,
            "architecture": self.architecture,
            "notes": self.notes,
            "tensors": [t.to_dict() for t in self.tensors],
        }


def _bpw(tensors: list[TensorReport]) -> float | None:
    params = sum(t.params for t in tensors)
    return 8 * sum(t.bytes for t in tensors) / params if params else None


def parse_provenance(metadata: dict[str, str]) -> dict | None:
    raw = metadata.get("qtool")
    if not raw:
        return None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def method_name(prov: dict | None, quantized: bool, fallback: str) -> str:
    recipe = (prov or {}).get("recipe")
    if isinstance(recipe, dict) and recipe.get("method"):
        return str(recipe["method"])
    return fallback if quantized else "none"


# -- KV cache ------------------------------------------------------------------------------------


def _first(cfg: dict, *keys: str):
    """The first of `keys` the config sets, as a positive int; None when absent or not one (a
    damaged config.json: the KV cache is then unknown rather than an error)."""
    for k in keys:
        v = cfg.get(k)
        if v is not None:
            return v if isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 40 else None
    return None


def kv_cache_from_config(config: dict, ctx: int, batch: int) -> KVCache | None:
    """KV cache of a Hugging Face config: layers × kv_heads × 2 × head_dim per token (16-bit).
    `head_dim` where the config gives it, else hidden_size / heads; no `num_key_value_heads` means
    multi-head attention (kv heads = attention heads). Multimodal configs: their `text_config`."""
    cfg = config
    if _first(cfg, "num_hidden_layers", "n_layer", "num_layers") is None and isinstance(config.get("text_config"), dict):
        cfg = config["text_config"]
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(cfg, "num_attention_heads", "n_head")
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    if not layers or not heads:
        return None
    kv_heads = 1 if cfg.get("multi_query") is True else (_first(cfg, "num_key_value_heads", "num_kv_heads") or heads)
    head_dim = _first(cfg, "head_dim") or (hidden // heads if hidden else None)
    if not head_dim:
        return None
    return KVCache(int(layers), int(kv_heads), int(head_dim), int(head_dim), ctx, batch)
