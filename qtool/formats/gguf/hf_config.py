"""A GGUF file's metadata as the Hugging Face `config.json` of the model llama.cpp would run: the
inverse of metadata.py's hyper-parameter writers, for the architectures whose GGUF metadata
transformers' own GGUF loader does not map (or maps without what llama.cpp hard-codes: gemma3's
sliding-window layout, smollm3's RoPE-less layers, qwen3moe's normalized routing weights).

Everything is read from the header alone; `READABLE` (GGUF architecture -> HF model_type) is what
GGUFSource checks before it imports transformers or touches a tensor.
"""

from __future__ import annotations

import gguf

from qtool.errors import FormatError, UnsupportedError

READABLE = {
    "qwen3": "qwen3",
    "qwen3moe": "qwen3_moe",
    "gemma3": "gemma3_text",
    "smollm3": "smollm3",
    "olmo2": "olmo2",
    "granite": "granite",
    "deepseek2": "deepseek_v3",
    "gpt-oss": "gpt_oss",
}
_SWA_DEFAULT = {"gemma3": 6, "gpt-oss": 2}  # llama.cpp's load_swa_pattern defaults


def _rope(get, theta_default: float = 10000.0) -> dict:
    rp = {"rope_type": "default", "rope_theta": get("rope.freq_base", theta_default)}
    kind = get("rope.scaling.type")
    if kind in (None, "none"):
        return rp
    if kind == "linear":
        return {**rp, "rope_type": "linear", "factor": get("rope.scaling.factor")}
    if kind == "yarn":
        out = {**rp, "rope_type": "yarn", "factor": get("rope.scaling.factor"),
               "original_max_position_embeddings": get("rope.scaling.original_context_length")}
        for key, hf in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow"),
                        ("rope.scaling.yarn_ext_factor", "extrapolation_factor"),
                        ("rope.scaling.yarn_attn_factor", "attention_factor")):
            if (v := get(key)) is not None:
                out[hf] = v
        return out
    raise UnsupportedError(f"GGUF RoPE scaling {kind!r} is not mapped back to a Hugging Face config")


def _layer_types(get, arch: str, n_layer: int) -> list[str] | None:
    pattern = get("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        is_swa = [bool(x) for x in pattern]
    else:
        n = int(pattern) if pattern is not None else _SWA_DEFAULT.get(arch, 0)
        if not n:
            return None
        is_swa = [i % n < n - 1 for i in range(n_layer)]
    return ["sliding_attention" if s else "full_attention" for s in is_swa]


def config_from_gguf(fields: dict, tensors: dict[str, tuple[int, ...]], arch: str, where: str) -> dict:
    """`fields`: GGUF key -> value; `tensors`: GGUF name -> torch-order shape."""
    if arch not in READABLE:
        raise UnsupportedError(f"{where}: GGUF architecture {arch!r} is not mapped back to a Hugging Face model")

    def get(key: str, default=None):
        v = fields.get(f"{arch}.{key}")
        return default if v is None else v

    if "token_embd.weight" not in tensors:
        raise FormatError(f"{where}: GGUF lacks token_embd.weight")
    n_layer, n_head = get("block_count"), get("attention.head_count")
    if n_layer is None or n_head is None or get("embedding_length") is None:
        raise FormatError(f"{where}: GGUF metadata lacks {arch}.block_count / embedding_length / attention.head_count")
    tok = gguf.Keys.Tokenizer
    c = {
        "model_type": READABLE[arch],
        "num_hidden_layers": n_layer,
        "hidden_size": get("embedding_length"),
        "num_attention_heads": n_head,
        "num_key_value_heads": get("attention.head_count_kv", n_head),
        "max_position_embeddings": get("context_length", 4096),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "vocab_size": tensors["token_embd.weight"][0],
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": fields.get(tok.BOS_ID),
        "eos_token_id": fields.get(tok.EOS_ID),
        "pad_token_id": fields.get(tok.PAD_ID),
        "rope_parameters": _rope(get),
    }
    if get("feed_forward_length") is not None:
        c["intermediate_size"] = get("feed_forward_length")
    if get("attention.key_length") is not None and arch not in ("deepseek2", "granite"):
        c["head_dim"] = get("attention.key_length")
    _ARCH_EXTRAS.get(arch, lambda c, get: None)(c, get)
    return c


def _qwen3moe(c: dict, get) -> None:
    # llama.cpp's qwen3moe always renormalizes the top-k routing weights
    c.update(num_experts=get("expert_count"), num_experts_per_tok=get("expert_used_count"),
             moe_intermediate_size=get("expert_feed_forward_length"), decoder_sparse_step=1, mlp_only_layers=[],
             norm_topk_prob=True)


def _gemma3(c: dict, get) -> None:
    n_layer, head_dim = c["num_hidden_layers"], c.get("head_dim", 256)
    c["query_pre_attn_scalar"] = c["hidden_size"] // c["num_attention_heads"] if n_layer == 62 else head_dim
    c["final_logit_softcapping"] = get("final_logit_softcapping")
    c["hidden_activation"] = "gelu_pytorch_tanh"
    full = _rope(get, 1_000_000.0)
    local = {"rope_type": "default", "rope_theta": get("rope.freq_base_swa", 10000.0)}
    c["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
    if get("attention.sliding_window"):
        c["sliding_window"] = get("attention.sliding_window")
        c["layer_types"] = _layer_types(get, "gemma3", n_layer)
    else:
        c["layer_types"] = ["full_attention"] * n_layer


def _smollm3(c: dict, get) -> None:
    n = c["num_hidden_layers"]  # llama.cpp: every 4th layer without RoPE
    c.update(no_rope_layer_interval=4, no_rope_layers=[int((i + 1) % 4 != 0) for i in range(n)])


def _granite(c: dict, get) -> None:
    c.update(attention_multiplier=get("attention.scale", 1.0), embedding_multiplier=get("embedding_scale", 1.0),
             residual_multiplier=get("residual_scale", 1.0), logits_scaling=get("logit_scale", 1.0))


def _deepseek2(c: dict, get) -> None:
    gating = get("expert_gating_func")
    if gating is not None and gating != int(gguf.ExpertGatingFuncType.SIGMOID):
        raise UnsupportedError("deepseek2 GGUF with softmax expert gating (DeepSeek-V2) is not mapped back; "
                               "only DeepSeek-V3-style sigmoid routing is")
    rope = get("rope.dimension_count")
    c.update(num_key_value_heads=c["num_attention_heads"], q_lora_rank=get("attention.q_lora_rank"),
             kv_lora_rank=get("attention.kv_lora_rank"), qk_rope_head_dim=rope,
             qk_nope_head_dim=get("attention.key_length_mla") - rope, v_head_dim=get("attention.value_length_mla"),
             moe_intermediate_size=get("expert_feed_forward_length"), n_routed_experts=get("expert_count"),
             num_experts_per_tok=get("expert_used_count"), n_shared_experts=get("expert_shared_count", 0),
             first_k_dense_replace=get("leading_dense_block_count", 0),
             routed_scaling_factor=get("expert_weights_scale", 1.0), norm_topk_prob=bool(get("expert_weights_norm", False)),
             n_group=get("expert_group_count", 1), topk_group=get("expert_group_used_count", 1), rope_interleave=True)
    if (log_mul := get("rope.scaling.yarn_log_multiplier")) is not None:
        c["rope_parameters"] = {**c["rope_parameters"], "mscale_all_dim": log_mul / 0.1}


def _gpt_oss(c: dict, get) -> None:
    c.update(num_local_experts=get("expert_count"), num_experts_per_tok=get("expert_used_count"),
             intermediate_size=get("expert_feed_forward_length"), sliding_window=get("attention.sliding_window"),
             layer_types=_layer_types(get, "gpt-oss", c["num_hidden_layers"]), attention_bias=True)


_ARCH_EXTRAS = {"qwen3moe": _qwen3moe, "gemma3": _gemma3, "smollm3": _smollm3, "granite": _granite,
                "deepseek2": _deepseek2, "gpt-oss": _gpt_oss}
