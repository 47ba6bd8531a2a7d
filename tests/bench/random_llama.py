"""A random-weight Llama checkpoint of any size, written without ever holding the model in memory.

Names and shapes come from a `LlamaForCausalLM` built on the meta device (so they are exactly what
transformers expects); each tensor is then drawn on its own from a seeded generator, cast to the
checkpoint dtype, and appended to a streaming safetensors shard. Peak memory: about one tensor.

    python tests/bench/random_llama.py OUT_DIR [--preset 1b|tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

PRESETS = {
    # ~1.1 B parameters, TinyLlama-shaped; ~2.2 GB in bf16.
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    # a few MB: for developing the bench itself.
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152),
}
SHARD_BYTES = 1 << 30
SEED = 0
DONE_MARK = ".complete"


def llama_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16", **kw)


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the checkpoint, in module order (from a meta-device model)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return [(n, tuple(t.shape)) for n, t in model.state_dict().items()]


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Norm weights ~ 1, everything else ~ N(0, 0.02) (the Llama initializer range)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.02).to(dtype)


def build(out: Path, preset: str = "1b", dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the checkpoint to `out` (sharded safetensors + index + config.json) unless already there."""
    from qtool.formats.st_stream import StreamingSafetensorsWriter

    if (out / DONE_MARK).is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = llama_config(**PRESETS[preset])
    gen = torch.Generator().manual_seed(SEED)
    specs = tensor_specs(config)
    shards: list[list[str]] = [[]]
    sizes = [0]
    for name, shape in specs:  # plan shards first so file names can carry the count
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if sizes[-1] and sizes[-1] + nbytes > SHARD_BYTES:
            shards.append([])
            sizes.append(0)
        shards[-1].append(name)
        sizes[-1] += nbytes
    shape_of = dict(specs)
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        st = StreamingSafetensorsWriter(tmp / fname, {"format": "pt"})
        for name in names:
            st.add(name, random_tensor(name, shape_of[name], gen, dtype))
            weight_map[name] = fname
        st.close()
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(tmp)
    (tmp / DONE_MARK).write_text("")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    args = ap.parse_args()
    print(build(args.out, args.preset))


if __name__ == "__main__":
    main()
