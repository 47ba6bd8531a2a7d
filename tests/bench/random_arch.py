"""Random-weight ~1 B checkpoints of non-llama architectures (qwen3_moe, gemma3_text) for the bench,
written tensor by tensor (peak memory: about one tensor), in the hub's on-disk layout, with
SmolLM2's tokenizer files so that llama.cpp's converter accepts them too.

Names and shapes come from the transformers model built on the meta device; transformers 5 keeps
MoE experts fused in memory (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj`
[E, H, I]), so those are written as the hub's per-expert Linears (`mlp.experts.{e}.gate_proj` ...),
the layout real Qwen3-MoE checkpoints have. Tied output heads are not written. Each tensor is drawn
from one seeded generator, in order: norms 1 (gemma's zero-centred norms 0), the rest N(0, 0.02).

    python tests/bench/random_arch.py OUT_DIR --preset qwen3_moe-1b|gemma3_text-1b|qwen3_moe-tiny|gemma3_text-tiny
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

PRESETS: dict[str, dict] = {
    # 1.07 B parameters (2.14 GB bf16): 12 layers of 32 experts (top 4), moe width 768
    "qwen3_moe-1b": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=1024, intermediate_size=3072,
                         moe_intermediate_size=768, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                         head_dim=128, num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, vocab_size=49152,
                         max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2),
    # 0.97 B parameters (1.94 GB bf16): gemma-3-1b's shape (34 layers, 5 local : 1 global) with SmolLM2's vocabulary
    "gemma3_text-1b": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=1152, intermediate_size=6912,
                           num_hidden_layers=34, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                           query_pre_attn_scalar=256, sliding_window=512, vocab_size=49152, max_position_embeddings=32768,
                           tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2),
    # a few MB: for developing the bench itself
    "qwen3_moe-tiny": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=128, intermediate_size=256,
                           moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                           num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, vocab_size=49152, tie_word_embeddings=False,
                           bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "gemma3_text-tiny": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=128, intermediate_size=256,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64,
                             sliding_window=64, vocab_size=49152, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2),
}
SHARD_BYTES = 1 << 30
SEED = 0
GENERATOR = "random_arch v1"  # change when the drawing changes: folders made by another version are rebuilt
DONE_MARK = ".complete"
TOK_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def make_config(preset: str):
    from transformers import AutoConfig

    kw = dict(PRESETS[preset])
    return AutoConfig.for_model(kw.pop("model_type"), dtype="bfloat16", **kw)


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the on-disk checkpoint, in module order."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = getattr(config, "tie_word_embeddings", False)
    specs = []
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        m = _FUSED.match(name)
        if not m:
            specs.append((name, tuple(t.shape)))
            continue
        experts, what = m.groups()
        n_exp = t.shape[0]
        for e in range(n_exp):
            if what == "gate_up_proj":  # [E, 2I, H]: gate rows first, then up
                half = t.shape[1] // 2
                specs += [(f"{experts}.{e}.gate_proj.weight", (half, t.shape[2])), (f"{experts}.{e}.up_proj.weight", (half, t.shape[2]))]
            else:  # [E, H, I]
                specs.append((f"{experts}.{e}.down_proj.weight", (t.shape[1], t.shape[2])))
    return specs


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, zero_norms: bool) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.zeros(shape, dtype=dtype) if zero_norms else torch.ones(shape, dtype=dtype)
    return torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.02).to(dtype)


def stamp(preset: str) -> str:
    """What made a folder: generator version, seed and preset; a folder with another stamp is rebuilt."""
    return hashlib.sha1(json.dumps([GENERATOR, SEED, PRESETS[preset]], sort_keys=True).encode()).hexdigest()[:16]


def build(out: Path, preset: str, tokenizer_from: Path | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the checkpoint to `out` unless a folder with this generator's stamp is already there."""
    from qtool.formats.st_stream import StreamingSafetensorsWriter

    mark = out / DONE_MARK
    if mark.is_file() and mark.read_text().strip() == stamp(preset):
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = make_config(preset)
    specs = tensor_specs(config)
    gen = torch.Generator().manual_seed(SEED)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    total = 0
    for name, shape in specs:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if size and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
        total += nbytes
    zero_norms = config.model_type.startswith("gemma")
    weight_map = {}
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        st = StreamingSafetensorsWriter(tmp / fname, {"format": "pt"})
        for name, shape in group:
            st.add(name, random_tensor(name, shape, gen, dtype, zero_norms))
            weight_map[name] = fname
        st.close()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(tmp)
    if tokenizer_from is not None:
        for f in TOK_FILES:
            if (tokenizer_from / f).is_file():
                shutil.copy2(tokenizer_from / f, tmp / f)
    (tmp / DONE_MARK).write_text(stamp(preset) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen3_moe-1b")
    ap.add_argument("--tokenizer-from", type=Path, default=None, help="folder whose tokenizer files to copy (SmolLM2's)")
    args = ap.parse_args()
    print(build(args.out, args.preset, args.tokenizer_from))


if __name__ == "__main__":
    main()
