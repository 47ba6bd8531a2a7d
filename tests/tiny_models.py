"""Seeded tiny random bf16 checkpoints built from real `transformers` configs, for end-to-end tests.

Widths are deliberately not all powers of two (hidden 96, intermediate 144/160/176) so that the
group-size adaptation of formats that cannot hold a partial group is exercised: 96 = 32·3,
144 = 16·9, 176 = 16·11, so `-g 32` keeps 32 on most layers but drops to 16 on some, and `-g 64`
adapts nearly everywhere. Every model is two decoder layers, vocab 256, and well under 1 MB.
`initializer_range` is raised from 0.02 to 0.08 so that logits are not all ~0 and quantization
error is visible in them.
"""

from __future__ import annotations

from pathlib import Path

import torch

SEED = 1234
COMMON = dict(
    vocab_size=256,
    hidden_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.08,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)

# arch -> (config class name, overrides of COMMON). What each one exercises is in the comment.
ARCHS: dict[str, tuple[str, dict]] = {
    # the baseline layout: q/k/v/o + gate/up/down, head_dim 24
    "llama": ("LlamaConfig", dict(intermediate_size=160)),
    # attention biases (q/k/v), which stay unquantized beside the packed weights
    "qwen2": ("Qwen2Config", dict(intermediate_size=160)),
    # down_proj input width 144 is not a multiple of 32: g32 adapts to 16 there
    "mistral": ("MistralConfig", dict(intermediate_size=144, sliding_window=None)),
    # tied embeddings, explicit head_dim, logit soft-capping, (1 + w) norms
    "gemma2": (
        "Gemma2Config",
        dict(intermediate_size=160, head_dim=32, query_pre_attn_scalar=32, sliding_window=64, tie_word_embeddings=True),
    ),
    # fused qkv_proj [(4+2+2)·24, 96] and gate_up_proj [2·176, 96]; down_proj width 176 = 16·11
    "phi3": ("Phi3Config", dict(intermediate_size=176, pad_token_id=0)),
    # mixture of experts: 4 routed experts (top-2) + a shared expert, routers left unquantized
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            intermediate_size=160,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=96,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
        ),
    ),
    # --- the architectures the "any model" issue names (transformers' own configs) ---
    # q/k norms (RMSNorm over head_dim) before RoPE, no attention bias
    "qwen3": ("Qwen3Config", dict(intermediate_size=160, head_dim=24)),
    # q/k norms + 4 routed experts (top-2), no shared expert
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(intermediate_size=160, head_dim=24, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
             decoder_sparse_step=1, mlp_only_layers=[]),
    ),
    # sandwich norms, q/k norms, (1 + w) norms, sliding/global layers, tied embeddings
    "gemma3_text": (
        "Gemma3TextConfig",
        dict(intermediate_size=160, head_dim=32, query_pre_attn_scalar=32, sliding_window=64, tie_word_embeddings=True,
             layer_types=["sliding_attention", "full_attention"]),
    ),
    # NoPE every 4th layer (here: layer 1 has no rotary), llama-style otherwise
    "smollm3": ("SmolLM3Config", dict(intermediate_size=160, no_rope_layer_interval=2)),
    # post-norms (after attention / MLP) and q/k norms over the whole projection
    "olmo2": ("Olmo2Config", dict(intermediate_size=160)),
    # llama with four scalar multipliers (embedding, residual, attention, logits)
    "granite": (
        "GraniteConfig",
        dict(intermediate_size=160, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.05,
             logits_scaling=4.0),
    ),
    # 4 experts (top-2) in block_sparse_moe, router "gate"
    "mixtral": ("MixtralConfig", dict(intermediate_size=160, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),

    # MLA attention (q/kv low-rank projections with their own norms), 1 dense block then MoE with a shared expert
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(intermediate_size=160, moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
             first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=16,
             qk_nope_head_dim=16, v_head_dim=24, num_key_value_heads=4),
    ),
    # fused 3-D experts with biases (gate_up interleaved), attention sinks, router with bias, sliding/full layers
    "gpt_oss": (
        "GptOssConfig",
        dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, head_dim=24, sliding_window=64,
             layer_types=["sliding_attention", "full_attention"]),
    ),
    # multimodal: Gemma3ForConditionalGeneration = a SigLIP vision tower + projector + the gemma3_text model above
    "gemma3": ("Gemma3Config", dict()),
}
# the architectures tests/test_architectures.py proves end to end; ZOO_NAMES: every config here
ARCH_NAMES = ("llama", "qwen2", "mistral", "gemma2", "phi3", "qwen2_moe")
ZOO_NAMES = tuple(ARCHS)


def make_config(arch: str):
    import transformers

    cls_name, overrides = ARCHS[arch]
    if arch == "gemma3":  # nested: a text config (the gemma3_text entry) and a tiny vision tower
        text = make_config("gemma3_text")
        vision = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=32, patch_size=8)
        cfg = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                                        image_token_index=255, boi_token_index=253, eoi_token_index=254)
        cfg.dtype = torch.bfloat16
        return cfg
    cfg = getattr(transformers, cls_name)(**{**COMMON, **overrides})
    cfg.dtype = torch.bfloat16
    return cfg


def make_model(arch: str) -> torch.nn.Module:
    """The tiny model in bf16, with seeded random weights (norm weights randomised too)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(make_config(arch), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms and biases: off their trivial init so that a mix-up would show
                p.add_(0.05 * torch.randn_like(p))
    return model.to(torch.bfloat16).eval()


def build_tiny(arch: str, folder: Path | str) -> Path:
    """Save the tiny `arch` model (config.json + model.safetensors, no tokenizer) into `folder`."""
    folder = Path(folder)
    make_model(arch).save_pretrained(folder)
    return folder


def build_tiny_with_byte_tokenizer(folder: Path, **config: object) -> Path:
    """A tiny llama with a 257-token byte-level tokenizer saved beside it, for methods that need
    calibration text (norm weights nudged off 1 so that they matter). `config` overrides fields."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    cfg = make_config("llama")
    cfg.vocab_size, cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id = len(vocab), len(vocab) - 1, None, None
    for k, v in config.items():
        setattr(cfg, k, v)
    save_random(cfg, folder, SEED)
    tok.save_pretrained(folder)
    return folder


def save_random(cfg, folder: Path, seed: int) -> Path:
    """A seeded random model from `cfg`, norm weights nudged off 1 so that they matter, saved bf16."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def build_tiny_with_tokenizer_of(folder: Path, tokenizer_dir: Path, arch: str = "llama", seed: int = SEED, **config: object) -> Path:
    """The tiny `arch` model (seeded random weights) with another model's vocabulary size and tokenizer
    files (SmolLM2's: a tokenizer llama.cpp's pre-tokenizer table knows, so GGUF can hold it).
    `config` overrides fields (of the text config, for a multimodal arch)."""
    import json
    import shutil

    folder = Path(folder)
    src = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    cfg = make_config(arch)
    text = getattr(cfg, "text_config", None) or cfg
    ids = dict(vocab_size=src["vocab_size"], bos_token_id=src.get("bos_token_id"), eos_token_id=src.get("eos_token_id"), pad_token_id=None)
    for k, v in {**ids, **config}.items():
        setattr(text, k, v)
        if text is not cfg and k != "vocab_size":
            setattr(cfg, k, v)
    save_random(cfg, folder, seed)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_dir) / f, folder / f)
    return folder
