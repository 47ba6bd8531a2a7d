"""`qtool inspect` for GGUF files: per-tensor GGML types, the model and tokenizer summary, the KV cache.

Read with `qtool.model.gguf_header` (headers only, arrays never expanded unless a value is asked
for), not gguf-py's reader: a 262k-token vocabulary would cost ~40 s and ~1 GB there."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from qtool.inspect.report import InspectReport, KVCache, TensorReport, layer_kind, method_name, parse_provenance
from qtool.model.gguf_header import GGUFHeader, file_type_name


# -- GGUF ------------------------------------------------------------------------------------------


def gguf_report(path: Path, ctx: int, batch: int) -> InspectReport:
    reader = GGUFHeader(path)
    rows = [_gguf_row(t) for t in reader.tensors]
    arch = reader.get("general.architecture")
    file_type = _gguf_file_type(reader, rows)
    prov = _gguf_provenance(reader)
    quantized = any(r.quantized for r in rows)
    method = method_name(prov, quantized, file_type or "unknown") if prov else (file_type or "none")
    counts = Counter(r.type for r in rows)
    notes = [f"tensor types: {', '.join(f'{t} ×{n}' for t, n in counts.most_common())}"]
    kv = _gguf_kv_cache(reader, arch, ctx, batch) if isinstance(arch, str) else None
    if kv is None:
        notes.append("KV cache size unknown: GGUF metadata lacks the attention keys")
    return InspectReport(str(path), "gguf", file_type, method, {path.name: path.stat().st_size}, rows,
                         ctx, batch, kv, prov, notes, gguf_summary(reader, arch if isinstance(arch, str) else None))


def gguf_summary(reader: GGUFHeader, arch: str | None) -> dict:
    """The metadata a user checks first: model hyper-parameters and what the tokenizer is."""

    def get(key: str):
        try:
            return reader.get(key)
        except Exception:  # a value that cannot be decoded: leave it out of a summary
            return None

    out = {
        "architecture": arch,
        "name": get("general.name"),
        "quantization_version": get("general.quantization_version"),
        "file_type": get("general.file_type"),
    }
    if arch:
        for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                  "attention.head_count", "attention.head_count_kv", "rope.freq_base", "expert_count"):
            out[k] = get(f"{arch}.{k}")
    template = get("tokenizer.chat_template")
    out["tokenizer"] = {
        "model": get("tokenizer.ggml.model"),
        "pre": get("tokenizer.ggml.pre"),
        "vocab_size": reader.count("tokenizer.ggml.tokens"),
        "merges": reader.count("tokenizer.ggml.merges"),
        "scores": reader.count("tokenizer.ggml.scores"),
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": get("tokenizer.ggml.eos_token_id"),
        "add_bos_token": get("tokenizer.ggml.add_bos_token"),
        "chat_template": f"{len(template)} characters" if isinstance(template, str) else None,
    }
    return {k: v for k, v in out.items() if v is not None}


def _gguf_row(t) -> TensorReport:
    return TensorReport(t.name, layer_kind(t.name), t.type_name, t.shape, t.n_elements, t.n_bytes,
                        quantized=t.block_size > 1)


def _gguf_file_type(reader: GGUFHeader, rows: list[TensorReport]) -> str | None:
    """`general.file_type` by its llama.cpp name (MOSTLY_Q8_0 -> Q8_0); without it, the type that
    holds the most parameters."""
    ft = reader.get("general.file_type")
    if isinstance(ft, int) and not isinstance(ft, bool):
        name = file_type_name(ft)
        if name is not None:
            return name
    by_params: Counter[str] = Counter()
    for r in rows:
        by_params[r.type] += r.params
    return by_params.most_common(1)[0][0] if by_params else None


def _gguf_provenance(reader: GGUFHeader) -> dict | None:
    for key in reader.fields:
        if key.startswith("qtool"):
            v = reader.get(key)
            if isinstance(v, str):
                prov = parse_provenance({"qtool": v})
                if prov:
                    return prov
    return None


def _gguf_kv_cache(reader: GGUFHeader, arch: str, ctx: int, batch: int) -> KVCache | None:
    def get(key: str):
        return reader.get(f"{arch}.{key}")

    layers, heads, hidden = get("block_count"), get("attention.head_count"), get("embedding_length")
    kv_heads = get("attention.head_count_kv")
    if not isinstance(layers, int) or heads is None:
        return None
    if kv_heads is None:
        kv_heads = heads
    head0 = max(heads) if isinstance(heads, list) else heads
    key_len = get("attention.key_length") or (hidden // head0 if isinstance(hidden, int) and head0 else None)
    value_len = get("attention.value_length") or key_len
    if not key_len:
        return None
    if isinstance(kv_heads, list):
        kv_heads = [int(h) for h in kv_heads]
    return KVCache(layers, kv_heads, int(key_len), int(value_len), ctx, batch)
