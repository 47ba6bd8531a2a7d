"""The checkpoint-against-architecture check from config.json and tensor headers alone, for the
plain dense decoders whose layout follows from a handful of config values (llama, mistral, qwen2,
qwen3), so that a run that needs no model object (GGUF from a calibration-free method: the writer
maps tensors by name) skips building one on the meta device. Building it costs seconds of imports
(transformers' modeling code pulls in torch._dynamo and torch.distributed) for the same answer.

`expected_tensors(config)` gives what transformers' model of that config loads (name -> shape,
the names a tied head may omit, the computed buffers a checkpoint may carry), or None for
anything outside these rules: another architecture, custom code (auto_map), a missing or
ill-typed size, a flag these rules do not model. Then the caller builds the model as before
(qtool/model/structure.py), which also gives the detailed refusals of a damaged config.
tests/test_header_check.py holds these rules equal to transformers' meta model (expected
shapes, tied names, buffers) over the variants each architecture has.
"""

from __future__ import annotations

from qtool.errors import FormatError

# model_type -> (class transformers builds, q/k/v biases, o bias, per-head q/k norms, head_dim default)
#   None in a bias column: the config's `attention_bias` decides; "cfg" head_dim: hidden / heads.
_RULES: dict[str, tuple[str, bool | None, bool | None, bool, int | None]] = {
    "llama": ("LlamaForCausalLM", None, None, False, None),
    "mistral": ("MistralForCausalLM", False, False, False, None),
    "qwen2": ("Qwen2ForCausalLM", True, False, False, None),
    "qwen3": ("Qwen3ForCausalLM", None, None, True, 128),
}
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_FLAGS = ("attention_bias", "mlp_bias", "tie_word_embeddings")
BUFFERS = ("inv_freq", "original_inv_freq")  # computed rotary buffers; older checkpoints still carry them
MAX_LAYERS = 4096  # as structure.MAX_MODULE_COUNT: a damaged config must not make a huge dict


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def expected_tensors(config: dict) -> tuple[str, dict[str, tuple[int, ...]], set[str]] | None:
    """(class name, checkpoint name -> shape, names a checkpoint may omit), or None (see module doc)."""
    mt = config.get("model_type")
    if not isinstance(mt, str) or mt not in _RULES or config.get("auto_map") or config.get("quantization_config"):
        return None
    cls, qkv_bias, o_bias, qk_norm, head_default = _RULES[mt]
    archs = config.get("architectures")
    if archs is not None and archs != [cls]:
        return None
    if not all(_int(config.get(k)) for k in _SIZES) or config["num_hidden_layers"] > MAX_LAYERS:
        return None
    if any(k in config and not isinstance(config[k], bool) for k in _FLAGS):
        return None
    H, V, I, L, nh = (config[k] for k in ("hidden_size", "vocab_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads"))
    nkv = config.get("num_key_value_heads")
    if nkv is None:
        if mt != "llama":
            return None  # the other classes' defaults (8, 32...) are their own: let transformers say
        nkv = nh
    hd = config.get("head_dim")
    if hd is None:
        if "head_dim" in config and head_default is not None:
            return None  # an explicit null where the class has its own default: let transformers say
        hd = head_default if head_default is not None else (H // nh if H % nh == 0 else None)
    if not (_int(nkv) and _int(hd)):
        return None
    if mt in ("mistral", "qwen2") and (config.get("attention_bias") or config.get("mlp_bias")):
        return None  # flags these classes ignore or that older/newer transformers read differently
    attn_bias = bool(config.get("attention_bias", False))
    qkv_b = attn_bias if qkv_bias is None else qkv_bias
    o_b = attn_bias if o_bias is None else o_bias
    mlp_b = bool(config.get("mlp_bias", False)) if mt == "llama" else False
    if mt == "qwen3" and config.get("mlp_bias"):
        return None
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        for proj, rows in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
            out[f"{p}self_attn.{proj}_proj.weight"] = (rows, H)
            if qkv_b:
                out[f"{p}self_attn.{proj}_proj.bias"] = (rows,)
        out[f"{p}self_attn.o_proj.weight"] = (H, nh * hd)
        if o_b:
            out[f"{p}self_attn.o_proj.bias"] = (H,)
        if qk_norm:
            out[f"{p}self_attn.q_norm.weight"] = (hd,)
            out[f"{p}self_attn.k_norm.weight"] = (hd,)
        for proj, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            out[f"{p}mlp.{proj}_proj.weight"] = shape
            if mlp_b:
                out[f"{p}mlp.{proj}_proj.bias"] = (shape[0],)
        out[f"{p}input_layernorm.weight"] = (H,)
        out[f"{p}post_attention_layernorm.weight"] = (H,)
    out["model.norm.weight"] = (H,)
    out["lm_head.weight"] = (V, H)
    tied = {"lm_head.weight"} if config.get("tie_word_embeddings", False) else set()
    return cls, out, tied


def check_tensor_names(cls: str, expected: dict[str, tuple[int, ...]], tied: set[str], buffers: set[str],
                       tensors: dict[str, tuple[int, ...]], where: str, ignore: list[str] = ()) -> None:
    """The checkpoint's tensors against the architecture: missing, extra or mis-shaped, named in one
    line (the same refusals, worded the same, whichever way `expected` was found)."""
    import re

    missing = [k for k in expected if k not in tensors and k not in tied]
    if missing:
        raise FormatError(f"{where}: tensor {missing[0]} {list(expected[missing[0]])} is missing "
                          f"({len(missing)} missing): the checkpoint does not match {cls}")
    extra = [k for k in tensors if k not in expected and not any(re.search(p, k) for p in ignore)
             and k.rsplit(".", 1)[-1] not in buffers]
    if extra:
        raise FormatError(f"{where}: tensor {extra[0]} is not part of {cls} "
                          f"({len(extra)} unexpected); the checkpoint does not match its config")
    for k, shape in tensors.items():
        if k in expected and tuple(shape) != tuple(expected[k]):
            raise FormatError(f"{where}: tensor {k} has shape {list(shape)}, {cls} "
                              f"with this config expects {list(expected[k])}")


def check_from_headers(config: dict, tensors: dict[str, tuple[int, ...]], where: str) -> bool:
    """True when the rules cover this config and the tensors passed; False: build the model instead."""
    found = expected_tensors(config)
    if found is None:
        return False
    cls, expected, tied = found
    check_tensor_names(cls, expected, tied, set(BUFFERS), tensors, where)
    return True
