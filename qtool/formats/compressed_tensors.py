"""compressed-tensors, the format vLLM and transformers (with the `compressed-tensors` package) load.

Integer weights are written `pack-quantized`: codes offset to unsigned and densely bit-packed along
the input dimension into int32 (`weight_packed`), `weight_scale` [out, groups] in the checkpoint
dtype, `weight_zero_point` (asymmetric only) packed the same way along the output dimension, and
`weight_shape`. float8 weights are written `float-quantized`: the float8 tensor as `weight` with
`weight_scale`. `config.json` gets the matching `quantization_config`, one config group per
distinct scheme (a layer whose width the group size does not divide gets its own group size:
compressed-tensors cannot hold a partial group).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from qtool.config import QuantRecipe
from qtool.core.packing import pack_bits
from qtool.core.qweight import QuantizedWeight
from qtool.formats import FORMATS
from qtool.errors import UnsupportedError
from qtool.formats.base import FormatWriter, write_folder_files
from qtool.formats.st_stream import StreamingSafetensorsWriter
from qtool.model.source import CheckpointSource

WEIGHTS_FILE = "model.safetensors"


def pack_int_weight(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """QuantizedWeight -> the pack-quantized tensors of one module (suffixes after `prefix.`)."""
    bits, offset = qw.qtype.bits, -int(qw.qtype.qmin)
    # signed -> unsigned codes in uint8 arithmetic (wraps mod 256 exactly like c + offset)
    out = {
        "weight_packed": pack_bits(qw.codes.view(torch.uint8) + offset, bits, dim=1),
        "weight_scale": qw.scale if qw.strategy != "tensor" else qw.scale.reshape(1),
        "weight_shape": torch.tensor(qw.shape, dtype=torch.int64),
    }
    if qw.zero_point is not None:
        out["weight_zero_point"] = pack_bits(qw.zero_point.view(torch.uint8) + offset, bits, dim=0)
    return out


def float_weight(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    scale = qw.scale if qw.strategy == "channel" else qw.scale.reshape(1)
    return {"weight": qw.codes, "weight_scale": scale}


def weights_args(qw: QuantizedWeight, actorder: str | None = None) -> dict:
    args = {
        "num_bits": qw.qtype.bits,
        "type": "int" if qw.qtype.is_int else "float",
        "symmetric": qw.symmetric,
        "strategy": qw.strategy,
        "group_size": qw.group_size,
        "dynamic": False,
        "actorder": actorder,
        "observer": "minmax",
    }
    return args


def compact_targets(names: list[str], all_linears: list[str]) -> list[str]:
    """Module names -> `re:` patterns with the block index generalised, where a pattern matches
    exactly these names among all linear modules; otherwise the names themselves."""
    chosen, patterns = set(names), {}
    for n in names:
        pat = "re:^" + re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)).replace("\\\\d", "\\d") + "$"
        patterns.setdefault(pat, []).append(n)
    out: list[str] = []
    for pat, members in patterns.items():
        rx = re.compile(pat[3:])
        hits = {m for m in all_linears if rx.match(m)}
        out.extend([pat] if hits == set(members) and hits <= chosen else members)
    return out


EXPERT_RE = re.compile(r".*\.experts\.\d+\.")


@FORMATS.register("compressed-tensors", aliases=("ct", "compressed_tensors"))
class CompressedTensorsWriter(FormatWriter):
    """Safetensors folder in the compressed-tensors layout (pack-quantized / float-quantized)."""

    partial_groups = False
    mixed_bits = True  # a config group per scheme: layers of different widths load (--target-bpw)

    def check_recipe(self, recipe: QuantRecipe) -> None:
        """GPTQ act-order with dynamic groups needs a per-column group map (`actorder: group` +
        `weight_g_idx`), which compressed-tensors 0.20 no longer accepts in a config. With
        --static-groups the groups stay contiguous (`actorder: weight`, no g_idx): that it loads."""
        super().check_recipe(recipe)
        p = recipe.method_params
        if p.get("act_order") and not p.get("static_groups") and recipe.strategy == "group":
            raise UnsupportedError(
                f"--act-order with --group-size {recipe.group_size}: --format {self.registry_name} cannot hold "
                "act-order group maps (compressed-tensors 0.20 refuses `actorder: group`); add --static-groups"
            )

    def check_plan(self, quantized: set[str], linears: list[str], recipe: QuantRecipe) -> None:
        """transformers (5.23, compressed-tensors 0.20) fuses MoE experts on load and, for integer
        schemes, can load them only when every expert is quantized and symmetric (its experts path
        drops zero points, and sends unquantized experts through the dequantizer). Refuse what it
        would reject, before anything is read; tests/test_architectures.py keeps both gaps visible."""
        experts = [m for m in linears if EXPERT_RE.match(m + ".")]
        if not experts or not recipe.weight_type.is_int:
            return
        if not recipe.symmetric and any(m in quantized for m in experts):
            raise UnsupportedError(
                f"--asym: transformers cannot load asymmetric MoE experts from --format {self.registry_name} "
                f"(e.g. {experts[0]}); use symmetric int or fp8"
            )
        left = [m for m in experts if m not in quantized]
        if left and quantized:
            raise UnsupportedError(
                f"layer {left[0]}: transformers cannot load integer {self.registry_name} MoE checkpoints whose "
                "experts stay unquantized; quantize all experts, or use --qtype fp8"
            )

    def begin(self, out: Path, source: CheckpointSource, recipe: QuantRecipe | None) -> None:
        self.out, self.source = out, source
        self.linears = [t.name[: -len(".weight")] for t in source.tensors() if t.name.endswith(".weight") and len(t.shape) == 2]
        structure = getattr(source, "_structure", None)  # the config names modules as the built model does
        self.to_memory = structure.memory_module if structure is not None else (lambda m: m)
        self.schemes: dict[tuple, list[str]] = {}
        self.quantized: set[str] = set()
        self.actorder = "weight" if recipe is not None and recipe.method_params.get("act_order") else None
        self.st = StreamingSafetensorsWriter(out / WEIGHTS_FILE, {"format": "pt"})

    def add_quantized(self, name: str, qw: QuantizedWeight) -> None:
        prefix = name[: -len(".weight")]
        if qw.float_zeros:  # the pipeline rounds them first (with_integer_zeros); never store them silently
            raise UnsupportedError(f"{prefix}: --format {self.registry_name} holds integer zero points, not float ones")
        trivial = torch.arange(qw.shape[1]) // (qw.group_size or qw.shape[1])
        if qw.g_idx is not None and not torch.equal(qw.g_idx.long().cpu(), trivial):
            raise UnsupportedError(f"{name}: an act-order group map (g_idx) cannot be stored in --format {self.registry_name}")
        tensors = pack_int_weight(qw) if qw.qtype.is_int else float_weight(qw)
        for suffix, t in tensors.items():
            self.st.add(f"{prefix}.{suffix}", t)
        key = json.dumps(weights_args(qw, self.actorder if qw.qtype.is_int else None), sort_keys=True)
        self.schemes.setdefault(key, []).append(prefix)
        self.quantized.add(prefix)

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        self.st.add(name, t)

    def quantization_config(self) -> dict:
        groups, formats = {}, set()
        linears = [self.to_memory(n) for n in self.linears]
        for i, (key, members) in enumerate(self.schemes.items()):
            args = json.loads(key)
            fmt = "pack-quantized" if args["type"] == "int" else "float-quantized"
            formats.add(fmt)
            groups[f"group_{i}"] = {
                "targets": compact_targets([self.to_memory(m) for m in members], linears),
                "weights": args,
                "input_activations": None,
                "output_activations": None,
                "format": fmt,
            }
        return {
            "quant_method": "compressed-tensors",
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": [self.to_memory(n) for n in self.linears if n not in self.quantized and not n.endswith("embed_tokens")],
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "version": "0.20.0",
        }

    def finish(self, config: dict, provenance: dict) -> None:
        self.st.metadata["qtool"] = json.dumps(provenance, sort_keys=True)
        self.st.close()
        write_folder_files(self.out, self.source, {**config, "quantization_config": self.quantization_config()}, provenance)

    def abort(self) -> None:
        if hasattr(self, "st"):
            self.st.abort()


# -- reading back (for tests, `inspect` and `export`) ----------------------------------------------
def scheme_for(module: str, qconfig: dict) -> dict | None:
    """The `weights` args of the config group whose targets match `module` (None if unquantized)."""
    def named(t: str) -> bool:
        return (t.startswith("re:") and re.match(t[3:], module) is not None) or t == module

    for group in qconfig.get("config_groups", {}).values():
        for t in group.get("targets", []):
            if named(t):
                return group["weights"]
            # a class-name target (llm-compressor writes `targets: [Linear]`): every quantized module
            # is a linear, so it matches unless the config's `ignore` names the module
            if t == "Linear" and not any(named(i) for i in qconfig.get("ignore") or []):
                return group["weights"]
    return None


def checkpoint_schemes(config: dict):
    """module (checkpoint name) -> its `weights` args. The config targets modules as the built model
    names them, which for some architectures (Gemma 3's `language_model.model.` on disk,
    `model.language_model.` in memory) differs from the tensor names: those are translated with
    the architecture's own conversion (qtool/model/structure.py), found once, when first needed."""
    qconfig = config.get("quantization_config", {})
    memo: dict = {}

    def memory_name(module: str) -> str:
        if "s" not in memo:
            try:
                from qtool.model.structure import discover

                memo["s"] = discover(config)
            except Exception:  # an architecture this transformers cannot build: names as they are
                memo["s"] = None
        return memo["s"].memory_module(module) if memo["s"] is not None else module

    def scheme(module: str) -> dict | None:
        args = scheme_for(module, qconfig)
        if args is None and qconfig.get("config_groups"):
            mem = memory_name(module)
            args = scheme_for(mem, qconfig) if mem != module else None
        return args

    return scheme


def unpack_module(tensors: dict[str, torch.Tensor], args: dict) -> QuantizedWeight:
    """The tensors of one module (suffix -> tensor) + its `weights` args -> QuantizedWeight."""
    from qtool.core.packing import unpack_bits
    from qtool.qtypes import get_qtype

    strategy, g = args["strategy"], args.get("group_size")
    if args["type"] == "float":
        qt = get_qtype("fp8_e4m3")
        scale = tensors["weight_scale"].reshape(-1, 1) if strategy == "channel" else tensors["weight_scale"].reshape(1, 1)
        return QuantizedWeight(qt, tensors["weight"], scale, None, strategy, None)
    qt = get_qtype(f"int{args['num_bits']}")
    out_f, in_f = (int(x) for x in tensors["weight_shape"].tolist())
    offset = -int(qt.qmin)
    codes = (unpack_bits(tensors["weight_packed"], qt.bits, in_f, dim=1) - offset).to(torch.int8)
    scale = tensors["weight_scale"]
    scale = scale.reshape(1, 1) if strategy == "tensor" else scale.reshape(out_f, -1)
    zero = None
    if "weight_zero_point" in tensors:
        zero = (unpack_bits(tensors["weight_zero_point"], qt.bits, out_f, dim=0) - offset).to(torch.int8)
    return QuantizedWeight(qt, codes, scale, zero, strategy, g if strategy == "group" else None)


def read_dequantized(folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A compressed-tensors folder -> plain state dict, dequantized with our reference math."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    qconfig = config.get("quantization_config", {})
    scheme = checkpoint_schemes(config)
    state: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                prefix, _, suffix = name.rpartition(".")
                if suffix.startswith("weight_") or (suffix == "weight" and scheme(prefix)):
                    modules.setdefault(prefix, {})[suffix] = h.get_tensor(name)
                else:
                    t = h.get_tensor(name)
                    state[name] = t.to(dtype) if t.is_floating_point() else t
    for prefix, tensors in modules.items():
        args = scheme(prefix)
        if args is None:
            raise ValueError(f"{folder}: module {prefix} has quantized tensors but no config group targets it")
        state[f"{prefix}.weight"] = unpack_module(tensors, args).dequantize(dtype)
    return state
