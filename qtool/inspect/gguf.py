"""`qtool inspect` for GGUF files: per-tensor GGML types, the model and tokenizer summary, the KV cache."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from qtool.inspect.report import InspectReport, KVCache, TensorReport, layer_kind, method_name, parse_provenance
from qtool.model.gguf_source import open_gguf, read_field


# -- GGUF ------------------------------------------------------------------------------------------


def gguf_report(path: Path, ctx: int, batch: int) -> InspectReport:
    import gguf

    reader = open_gguf(path)
    rows = [_gguf_row(t) for t in reader.tensors]
    arch = read_field(reader, gguf.Keys.General.ARCHITECTURE, path)
    file_type = _gguf_file_type(reader, rows, path)
    prov = _gguf_provenance(reader, path)
    quantized = any(r.quantized for r in rows)
    method = method_name(prov, quantized, file_type or "unknown") if prov else (file_type or "none")
    counts = Counter(r.type for r in rows)
    notes = [f"tensor types: {', '.join(f'{t} ×{n}' for t, n in counts.most_common())}"]
    kv = _gguf_kv_cache(reader, arch, ctx, batch, path) if isinstance(arch, str) else None
    if kv is None:
        notes.append("KV cache size unknown: GGUF metadata lacks the attention keys")
    return InspectReport(str(path), "gguf", file_type, method, {path.name: path.stat().st_size}, rows,
                         ctx, batch, kv, prov, notes, gguf_summary(reader, arch if isinstance(arch, str) else None))


def gguf_summary(reader, arch: str | None) -> dict:
    """The metadata a user checks first: model hyper-parameters and what the tokenizer is."""
    fields = reader.fields

    def get(key: str):
        f = fields.get(key)
        if f is None or not f.types:
            return None
        try:
            return f.contents()
        except Exception:  # a value gguf-py cannot decode: leave it out of a summary
            return None

    def count(key: str) -> int | None:
        f = fields.get(key)
        return len(f.data) if f is not None else None

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
        "vocab_size": count("tokenizer.ggml.tokens"),
        "merges": count("tokenizer.ggml.merges"),
        "scores": count("tokenizer.ggml.scores"),
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": get("tokenizer.ggml.eos_token_id"),
        "add_bos_token": get("tokenizer.ggml.add_bos_token"),
        "chat_template": f"{len(template)} characters" if isinstance(template, str) else None,
    }
    return {k: v for k, v in out.items() if v is not None}


def _gguf_row(t) -> TensorReport:
    import gguf

    block, _ = gguf.GGML_QUANT_SIZES[t.tensor_type]
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGML lists the fastest axis first
    return TensorReport(t.name, layer_kind(t.name), t.tensor_type.name, shape, int(t.n_elements),
                        int(t.n_bytes), quantized=block > 1)


def _gguf_file_type(reader, rows: list[TensorReport], path: Path) -> str | None:
    """`general.file_type` by its llama.cpp name (MOSTLY_Q8_0 -> Q8_0); without it, the type that
    holds the most parameters."""
    import gguf

    ft = read_field(reader, gguf.Keys.General.FILE_TYPE, path)
    if isinstance(ft, int):
        try:
            return gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    by_params: Counter[str] = Counter()
    for r in rows:
        by_params[r.type] += r.params
    return by_params.most_common(1)[0][0] if by_params else None


def _gguf_provenance(reader, path: Path) -> dict | None:
    for key in reader.fields:
        if key.startswith("qtool"):
            v = read_field(reader, key, path)
            if isinstance(v, str):
                prov = parse_provenance({"qtool": v})
                if prov:
                    return prov
    return None


def _gguf_kv_cache(reader, arch: str, ctx: int, batch: int, path: Path) -> KVCache | None:
    import gguf

    keys = gguf.Keys

    def get(key: str):
        return read_field(reader, key.format(arch=arch), path)

    layers, heads, hidden = get(keys.LLM.BLOCK_COUNT), get(keys.Attention.HEAD_COUNT), get(keys.LLM.EMBEDDING_LENGTH)
    kv_heads = get(keys.Attention.HEAD_COUNT_KV)
    if not isinstance(layers, int) or heads is None:
        return None
    if kv_heads is None:
        kv_heads = heads
    head0 = max(heads) if isinstance(heads, list) else heads
    key_len = get(keys.Attention.KEY_LENGTH) or (hidden // head0 if isinstance(hidden, int) and head0 else None)
    value_len = get(keys.Attention.VALUE_LENGTH) or key_len
    if not key_len:
        return None
    if isinstance(kv_heads, list):
        kv_heads = [int(h) for h in kv_heads]
    return KVCache(layers, kv_heads, int(key_len), int(value_len), ctx, batch)
