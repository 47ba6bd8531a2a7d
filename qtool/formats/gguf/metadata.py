"""Per-architecture facts and hyper-parameter metadata, as llama.cpp's `convert_hf_to_gguf.py`
writes them (conversion/base.py `TextModel.set_gguf_parameters`, conversion/llama.py, qwen.py,
gemma.py, phi.py in the llama-cpp-python 0.3.36 vendored tree). Keys are written through gguf-py's
`GGUFWriter.add_*` helpers, which pick the value types llama.cpp reads (u32, f32, bool...).

What an architecture needs beyond a rename is declared in `ArchSpec`; anything llama.cpp would
compute differently from transformers (an unknown RoPE scaling, gemma2's attention scale on an
unusual model) is refused with `UnsupportedError` rather than written wrongly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch

from qtool.errors import UnsupportedError
from qtool.formats.gguf.mixtures import Mixture, ModelFacts

A = gguf.MODEL_ARCH


@dataclass(frozen=True)
class ArchSpec:
    arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # LlamaModel.permute: HF rotate-half rows -> GGML interleaved pairs
    norm_plus_one: bool = False  # gemma: HF keeps (w - 1) in *norm.weight, llama.cpp wants w
    skip_lm_head: bool = False  # gemma: convert drops lm_head.weight (tied)
    vocab: str = "gpt2"  # which convert set_vocab(): "llama", "qwen2", "gpt2", "gemma", "gemma3", "phi3"
    swa_pattern: int = 0  # llama.cpp's default sliding-window pattern for the arch (0: none assumed)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


# HF model_type -> what convert_hf_to_gguf does with it. Mistral and Mixtral convert as "llama"
# (LlamaModel is registered for MistralForCausalLM and MixtralForCausalLM); a multimodal Gemma 3
# (Gemma3ForConditionalGeneration) converts its language model as "gemma3", the vision tower and
# projector being left to the separate mmproj file.
ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(A.LLAMA, permute_qk=True, vocab="llama"),
    "mistral": ArchSpec(A.LLAMA, permute_qk=True, vocab="llama"),
    "mixtral": ArchSpec(A.LLAMA, permute_qk=True, vocab="llama"),
    "qwen2": ArchSpec(A.QWEN2, vocab="qwen2"),
    "qwen2_moe": ArchSpec(A.QWEN2MOE, vocab="gpt2"),
    "qwen3": ArchSpec(A.QWEN3, vocab="qwen2"),
    "qwen3_moe": ArchSpec(A.QWEN3MOE, vocab="gpt2"),
    "gemma2": ArchSpec(A.GEMMA2, norm_plus_one=True, skip_lm_head=True, vocab="gemma"),
    "gemma3_text": ArchSpec(A.GEMMA3, norm_plus_one=True, vocab="gemma3", swa_pattern=6),
    "gemma3": ArchSpec(A.GEMMA3, norm_plus_one=True, vocab="gemma3", swa_pattern=6),
    "phi3": ArchSpec(A.PHI3, vocab="phi3"),
    "smollm3": ArchSpec(A.SMOLLM3, permute_qk=True, vocab="llama"),
    "olmo2": ArchSpec(A.OLMO2, vocab="gpt2"),
    "granite": ArchSpec(A.GRANITE, permute_qk=True, vocab="llama"),
    "deepseek_v2": ArchSpec(A.DEEPSEEK2, vocab="gpt2"),
    "deepseek_v3": ArchSpec(A.DEEPSEEK2, vocab="gpt2"),
    "gpt_oss": ArchSpec(A.GPT_OSS, vocab="gpt2", swa_pattern=2),
}


def text_config(config: dict) -> dict:
    """TextModel.__init__: a multimodal config's `text_config` merged into the top level."""
    if isinstance(config.get("text_config"), dict):
        return {**config, **config["text_config"]}
    return config


def arch_spec(config: dict) -> ArchSpec:
    mt = config.get("model_type")
    if mt not in ARCHS:
        raise UnsupportedError(f"--format gguf: architecture {mt!r} is not supported; supported: {', '.join(ARCHS)}")
    spec = ARCHS[mt]
    check_config(text_config(config), spec)
    return spec


def gguf_support(config: dict) -> str | None:
    """None when `--format gguf` takes this config, else the one-line reason (for `qtool inspect`)."""
    try:
        arch_spec(config)
    except UnsupportedError as e:
        return str(e).removeprefix("--format gguf: ")
    return None


def check_config(config: dict, spec: ArchSpec) -> None:
    """What llama.cpp hard-codes for an architecture and a config could set otherwise: refused from
    the config, before any tensor is read, where the file would load and compute something else."""
    mt, n_layer = config.get("model_type"), config["num_hidden_layers"]
    if spec.arch == A.SMOLLM3:
        # llama.cpp: hparams.n_no_rope_layer_step = 4, no key to say otherwise
        want = [int((i + 1) % 4 != 0) for i in range(n_layer)]
        got = config.get("no_rope_layers")
        if got is None and config.get("no_rope_layer_interval") is not None:
            got = [int((i + 1) % config["no_rope_layer_interval"] != 0) for i in range(n_layer)]
        if got is not None and list(got) != want:
            raise UnsupportedError("--format gguf: smollm3 with RoPE-less layers other than every 4th "
                                   f"(no_rope_layers={list(got)}): llama.cpp fixes that interval at 4")
    if spec.arch == A.GEMMA3:
        head_dim = config.get("head_dim", 256)
        expected = config["hidden_size"] // config["num_attention_heads"] if n_layer == 62 else head_dim
        if config.get("query_pre_attn_scalar", expected) != expected:
            raise UnsupportedError(f"--format gguf: gemma3 query_pre_attn_scalar {config['query_pre_attn_scalar']} "
                                   f"differs from the {expected} llama.cpp uses for this shape")
        if config.get("attn_logit_softcapping") is not None:
            raise UnsupportedError("--format gguf: gemma3 with attn_logit_softcapping: llama.cpp's gemma3 has none")
    if spec.arch == A.QWEN3MOE:
        # llama.cpp's qwen3moe: every layer sparse, top-k weights always renormalized
        if not config.get("norm_topk_prob", False):
            raise UnsupportedError("--format gguf: qwen3_moe with norm_topk_prob=false: llama.cpp's qwen3moe "
                                   "always renormalizes the routing weights")
        if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
            raise UnsupportedError("--format gguf: qwen3_moe with dense layers (mlp_only_layers / decoder_sparse_step): "
                                   "llama.cpp's qwen3moe has experts in every layer")
    if spec.arch == A.DEEPSEEK2:
        if config.get("rope_interleave") is False:
            raise UnsupportedError(f"--format gguf: {mt} with rope_interleave=false: llama.cpp's deepseek2 "
                                   "rotates interleaved pairs")
        if n_kv_heads(config) != config["num_attention_heads"]:
            raise UnsupportedError(f"--format gguf: {mt} kv_b_proj with {n_kv_heads(config)} heads for "
                                   f"{config['num_attention_heads']} query heads cannot be split as llama.cpp does")


def _first(config: dict, *keys: str):
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    return None


def rope_parameters(config: dict) -> dict:
    """transformers 5 `rope_parameters`, or the older `rope_scaling` + top-level `rope_theta`,
    merged the way TextModel.__init__ does."""
    rp = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rp = dict(rp.get("full_attention", rp))
    if "rope_theta" not in rp and (theta := _first(config, "rope_theta", "rotary_emb_base")) is not None:
        rp["rope_theta"] = theta
    if "rope_type" not in rp and rp.get("type") is not None:
        rp["rope_type"] = rp["type"]
    for k in ("partial_rotary_factor", "original_max_position_embeddings"):
        if k not in rp and config.get(k) is not None:
            rp[k] = config[k]
    return rp


EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def n_kv_heads(config: dict) -> int:
    return int(config.get("num_key_value_heads") or config["num_attention_heads"])


def model_facts(config: dict, spec: ArchSpec) -> ModelFacts:
    """What llama-quantize's rules look at, derived as llama.cpp's loader would."""
    n_layer, n_head, n_kv = config["num_hidden_layers"], config["num_attention_heads"], n_kv_heads(config)
    n_expert = int(_first(config, *EXPERT_COUNT_KEYS) or 0)
    if spec.arch == A.DEEPSEEK2:
        n_kv = 1  # MLA is written as MQA (one KV head), which is what llama-quantize's n_gqa sees
    if spec.arch == A.LLAMA:
        is_70b = n_expert != 8 and n_layer == 80 and n_head != n_kv
    else:
        is_70b = spec.arch == A.QWEN2 and n_layer == 80
    return ModelFacts(n_layer, n_head, n_kv, n_expert, is_70b)


# -- hyper-parameters ------------------------------------------------------------------------------


def _rope_scaling(w: gguf.GGUFWriter, rp: dict) -> None:
    """TextModel.set_gguf_parameters' RoPE scaling branch; types llama.cpp would ignore are refused."""
    kind, factor = (rp.get("rope_type") or "default").lower(), rp.get("factor")
    if kind == "default":
        return
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rp.get(key) is not None:
                add(rp[key])
        if (af := rp.get("attention_factor", rp.get("attn_factor"))) is not None:
            w.add_rope_scaling_yarn_attn_factor(af)
    elif kind in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    elif kind == "llama3":
        pass  # carried by the rope_freqs tensor (llama3_rope_factors)
    else:
        raise UnsupportedError(f"--format gguf: RoPE scaling {kind!r} is not one llama.cpp reads from this converter")


def llama3_rope_factors(config: dict) -> torch.Tensor | None:
    """LlamaModel.generate_extra_tensors: the per-frequency factors of Llama 3.1 RoPE scaling,
    written as the `rope_freqs.weight` tensor."""
    rp = rope_parameters(config)
    if (rp.get("rope_type") or "").lower() != "llama3":
        return None
    base = rp.get("rope_theta", 10000.0)
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rp.get("factor", 8.0)
    lo, hi = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old_ctx = rp.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / hi:
            out.append(1.0)
        elif wavelen > old_ctx / lo:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _generic(w: gguf.GGUFWriter, config: dict) -> None:
    """TextModel.set_gguf_parameters (llama, qwen2, qwen2_moe start from it)."""
    w.add_block_count(config["num_hidden_layers"])
    if (n_ctx := _first(config, "max_position_embeddings", "n_ctx", "n_positions")) is not None:
        w.add_context_length(n_ctx)
    w.add_embedding_length(config["hidden_size"])
    if (n_ff := _first(config, "prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size")) is not None:
        w.add_feed_forward_length(n_ff)
    w.add_head_count(config["num_attention_heads"])
    if config.get("num_key_value_heads") is not None:
        w.add_head_count_kv(config["num_key_value_heads"])
    rp = rope_parameters(config)
    _rope_scaling(w, rp)
    if rp.get("rope_theta") is not None:
        w.add_rope_freq_base(rp["rope_theta"])
    if (theta := swa_rope_theta(config)) is not None:
        w.add_rope_freq_base_swa(theta)
    if (eps := _first(config, "rms_norm_eps", "norm_eps")) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (n := _first(config, *EXPERT_COUNT_KEYS)) is not None:
        w.add_expert_count(n)
    if (n := _first(config, "num_experts_per_tok", "num_experts_per_token", "top_k_experts")) is not None:
        w.add_expert_used_count(n)
    if config.get("n_group") is not None:
        w.add_expert_group_count(config["n_group"])
    if config.get("topk_group") is not None:
        w.add_expert_group_used_count(config["topk_group"])
    if (score := _first(config, "score_function", "scoring_func", "score_func")) is not None:
        if score not in ("sigmoid", "softmax"):
            raise UnsupportedError(f"--format gguf: expert scoring function {score!r} is not one llama.cpp knows")
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if score == "sigmoid" else gguf.ExpertGatingFuncType.SOFTMAX)
    if config.get("head_dim") is not None:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])


def swa_rope_theta(config: dict) -> float | None:
    """The RoPE base of sliding-window layers (gemma3's `sliding_attention` parameters)."""
    rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if "sliding_attention" in rp or "full_attention" in rp:
        return rp.get("sliding_attention", {}).get("rope_theta")
    return _first(config, "local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta", "rope_local_base_freq")


def sliding_pattern(config: dict, spec: ArchSpec) -> list[bool] | None:
    """Which layers use the sliding window, when that differs from the pattern llama.cpp assumes for
    the arch (`load_swa_pattern`'s default): written as `attention.sliding_window_pattern`, which
    llama.cpp reads in preference. None where the default already holds (convert_hf_to_gguf writes
    nothing then, and neither do we)."""
    types = config.get("layer_types")
    if not spec.swa_pattern or not types or not config.get("sliding_window"):
        return None
    is_swa = [t == "sliding_attention" for t in types]
    n = spec.swa_pattern
    default = [i % n < n - 1 for i in range(len(types))]
    return None if is_swa == default else is_swa


def _llama(w: gguf.GGUFWriter, config: dict) -> None:
    _generic(w, config)
    w.add_vocab_size(config["vocab_size"])
    w.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _qwen2_moe(w: gguf.GGUFWriter, config: dict) -> None:
    _generic(w, config)
    if config.get("moe_intermediate_size") is not None:
        w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if config.get("shared_expert_intermediate_size") is not None:
        w.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])


def _gemma2(w: gguf.GGUFWriter, config: dict) -> None:
    """Gemma2Model.set_gguf_parameters. It writes no RoPE base (llama.cpp assumes 10000): we add
    one only when the model's differs, which llama.cpp then reads."""
    head_dim, n_head, n_layer = config["head_dim"], config["num_attention_heads"], config["num_hidden_layers"]
    # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(n_embd/n_head) for the 46-layer 27B
    expected = config["hidden_size"] // n_head if n_layer == 46 else head_dim
    if config.get("query_pre_attn_scalar", expected) != expected:
        raise UnsupportedError(f"--format gguf: gemma2 query_pre_attn_scalar {config['query_pre_attn_scalar']} "
                               f"differs from the {expected} llama.cpp uses for this shape")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(n_layer)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv_heads(config))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    w.add_final_logit_softcapping(config["final_logit_softcapping"])
    w.add_sliding_window(config["sliding_window"])
    theta = rope_parameters(config).get("rope_theta", 10000.0)
    if theta != 10000.0:
        w.add_rope_freq_base(theta)


def _phi3(w: gguf.GGUFWriter, config: dict) -> None:
    """Phi3MiniModel.set_gguf_parameters."""
    rp = rope_parameters(config)
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    w.add_context_length(_first(config, "n_positions", "max_position_embeddings"))
    w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv_heads(config))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_dimension_count(int(rp.get("partial_rotary_factor", 1.0) * n_embd) // n_head)
    w.add_rope_freq_base(rp["rope_theta"])
    w.add_sliding_window(config.get("sliding_window") or 0)
    if rp.get("long_factor"):
        w.add_rope_scaling_attn_factors(longrope(config)[0])


def longrope(config: dict) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Phi3MiniModel.generate_extra_tensors: LongRoPE's attention factor and its long and short
    per-frequency factors (`rope_factors_long/short.weight`)."""
    rp = rope_parameters(config)
    n_head = config["num_attention_heads"]
    rope_dims = int(rp.get("partial_rotary_factor", 1.0) * config["hidden_size"]) // n_head
    orig = rp["original_max_position_embeddings"]
    scale = _first(config, "n_positions", "max_position_embeddings") / orig
    kind = (rp.get("rope_type") or "").lower()
    if kind not in ("su", "longrope"):
        raise UnsupportedError(f"--format gguf: phi3 RoPE factors with rope_type {kind!r}: llama.cpp reads them for longrope only")
    factor = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    if rp.get("attention_factor") is not None and not math.isclose(rp["attention_factor"], factor, rel_tol=1e-6):
        raise UnsupportedError(f"--format gguf: phi3 LongRoPE attention_factor {rp['attention_factor']} differs "
                               f"from the {factor:.6g} llama.cpp's converter derives")
    long, short = rp.get("long_factor"), rp.get("short_factor")
    if not short or len(long) != len(short) or len(long) * 2 != rope_dims:
        raise UnsupportedError(f"--format gguf: phi3 LongRoPE needs long and short factors of length {rope_dims // 2}")
    return factor, torch.tensor(long, dtype=torch.float32), torch.tensor(short, dtype=torch.float32)


def _qwen3_moe(w: gguf.GGUFWriter, config: dict) -> None:
    _qwen2_moe(w, config)


def _gemma3(w: gguf.GGUFWriter, config: dict) -> None:
    """Gemma3Model.set_gguf_parameters (on top of the generic keys)."""
    _generic(w, config)
    w.add_context_length(config.get("max_position_embeddings", 131072))
    w.add_head_count(config.get("num_attention_heads", 8))
    w.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    w.add_key_length(config.get("head_dim", 256))
    w.add_value_length(config.get("head_dim", 256))
    w.add_rope_freq_base(rope_parameters(config).get("rope_theta", 1_000_000.0))
    if config.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(config["final_logit_softcapping"])
    if config.get("sliding_window_pattern") != 1:
        w.add_sliding_window(config["sliding_window"])
    w.add_head_count_kv(config.get("num_key_value_heads", 4))


def _olmo2(w: gguf.GGUFWriter, config: dict) -> None:
    """Olmo2Model.set_gguf_parameters."""
    _generic(w, config)
    if "sliding_window" in config:
        w.add_sliding_window(config["sliding_window"])
        types = config.get("layer_types")
        n = config["num_hidden_layers"]
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types] if types else [(i + 1) % 4 != 0 for i in range(n)])


def _granite(w: gguf.GGUFWriter, config: dict) -> None:
    """GraniteModel.set_gguf_parameters: llama's keys without head_dim, plus four multipliers."""
    config = {k: v for k, v in config.items() if k != "head_dim"}
    _llama(w, config)
    for key, add in (("attention_multiplier", w.add_attention_scale), ("embedding_multiplier", w.add_embedding_scale),
                     ("residual_multiplier", w.add_residual_scale), ("logits_scaling", w.add_logit_scale)):
        if config.get(key):
            add(config[key])


def _deepseek2(w: gguf.GGUFWriter, config: dict) -> None:
    """DeepseekV2Model.set_gguf_parameters: MLA written as MQA with wide heads (one KV head of
    kv_lora_rank + rope dims), decompressed to MHA by llama.cpp."""
    config = {**config, "num_key_value_heads": 1, "rms_norm_eps": config.get("rms_norm_eps", 1e-6)}
    _generic(w, config)
    has_moe = config.get("n_routed_experts") is not None
    first_dense = config.get("first_k_dense_replace")
    w.add_leading_dense_block_count(first_dense if first_dense is not None else (0 if has_moe else config["num_hidden_layers"]))
    kv_lora = config.get("kv_lora_rank", 512)
    w.add_vocab_size(config["vocab_size"])
    if config.get("q_lora_rank") is not None:
        w.add_q_lora_rank(config["q_lora_rank"])
    w.add_kv_lora_rank(kv_lora)
    w.add_key_length(kv_lora + config["qk_rope_head_dim"])
    w.add_value_length(kv_lora)
    w.add_key_length_mla(config["qk_nope_head_dim"] + config["qk_rope_head_dim"])
    w.add_value_length_mla(config["v_head_dim"])
    w.add_expert_feed_forward_length(_first(config, "moe_intermediate_size", "intermediate_size"))
    if has_moe:
        w.add_expert_count(config["n_routed_experts"])
    w.add_expert_shared_count(config.get("n_shared_experts", 0))
    if config.get("routed_scaling_factor") is not None:
        w.add_expert_weights_scale(config["routed_scaling_factor"])
    if config.get("norm_topk_prob"):
        w.add_expert_weights_norm(config["norm_topk_prob"])
    w.add_rope_dimension_count(config["qk_rope_head_dim"])
    if (mscale := (config.get("rope_parameters") or config.get("rope_scaling") or {}).get("mscale_all_dim")) is not None:
        w.add_rope_scaling_yarn_log_mul(0.1 * mscale)


def _gpt_oss(w: gguf.GGUFWriter, config: dict) -> None:
    """GptOssModel.set_gguf_parameters."""
    _generic(w, config)
    w.add_sliding_window(config["sliding_window"])
    w.add_expert_feed_forward_length(config["intermediate_size"])


_HPARAMS = {A.LLAMA: _llama, A.QWEN2: _generic, A.QWEN2MOE: _qwen2_moe, A.GEMMA2: _gemma2, A.PHI3: _phi3,
            A.QWEN3: _generic, A.QWEN3MOE: _qwen3_moe, A.GEMMA3: _gemma3, A.SMOLLM3: _llama, A.OLMO2: _olmo2,
            A.GRANITE: _granite, A.DEEPSEEK2: _deepseek2, A.GPT_OSS: _gpt_oss}


def write_hparams(w: gguf.GGUFWriter, config: dict, spec: ArchSpec, mix: Mixture) -> None:
    """The architecture's set_gguf_parameters() (a later write of a key replaces an earlier one, as
    in the converter), then what llama.cpp needs beyond it (a sliding-window layout other than the
    arch's default)."""
    _HPARAMS[spec.arch](w, config)
    if (pattern := sliding_pattern(config, spec)) is not None:
        w.add_sliding_window_pattern(pattern)
    w.add_file_type(int(mix.ftype))


# -- general.* -------------------------------------------------------------------------------------


# general.* keys that describe the model (not this file): kept when the source is a GGUF file, as
# llama-quantize keeps every key of its input.
_MODEL_GENERAL = ("general.name", "general.author", "general.version", "general.organization", "general.finetune",
                  "general.basename", "general.description", "general.size_label", "general.license",
                  "general.license.name", "general.license.link", "general.url", "general.repo_url",
                  "general.tags", "general.languages", "general.datasets")


def copy_gguf_fields(w: gguf.GGUFWriter, path: Path, keep) -> None:
    """Copy the fields of a GGUF file for which `keep(name)` holds, value types included."""
    for field in gguf.GGUFReader(path).fields.values():
        if keep(field.name):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def write_general_from_gguf(w: gguf.GGUFWriter, path: Path) -> None:
    w.add_type(gguf.GGUFType.MODEL)
    copy_gguf_fields(w, path, lambda k: k in _MODEL_GENERAL or k.startswith(("general.base_model.", "general.source.")))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_general(w: gguf.GGUFWriter, folder: Path | None, fallback_name: str, params: tuple[int, int, int, int]) -> None:
    """general.type/name/basename/size_label... through gguf-py's `Metadata` (model card and folder
    name heuristics, as convert_hf_to_gguf), then general.quantization_version."""
    meta = gguf.Metadata.load(None, folder, None, params[0])
    if meta.name is None:
        meta.name = fallback_name
    if meta.size_label is None and params[0] > 0:
        meta.size_label = gguf.size_label(*params)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
