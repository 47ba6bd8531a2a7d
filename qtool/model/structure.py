"""What a checkpoint's architecture is, derived from transformers rather than from a list.

A config is accepted when transformers implements its `model_type` as a causal LM (or, for
multimodal checkpoints, as an image-text-to-text `...ForConditionalGeneration`). The model is
built from the config on the meta device with transformers' own modules (no weights, no memory),
and everything qtool needs is read off it:

* the decoder blocks: the ModuleList of the language model's decoder (`get_decoder()`), so a
  vision tower's `encoder.layers.N` is not mistaken for one;
* the checkpoint layout transformers expects: the meta state dict passed through transformers'
  own save-time conversion (`revert_weight_conversion`), which is how, for example, MoE experts
  held fused in memory (`mlp.experts.gate_up_proj [E, 2I, H]`) are stored per expert on disk
  (`mlp.experts.N.gate_proj.weight`), and Gemma 3's `model.language_model.` is stored as
  `language_model.model.`. Checkpoints in the in-memory layout load too and are accepted;
* per block, the quantizable linears as checkpoint tensors: the weights of `nn.Linear` modules,
  and the per-expert pieces of fused expert parameters (a fused expert tensor that the checkpoint
  itself stores 3-D, as gpt-oss does, is no Linear any consumer quantizes: it stays full precision).

Everything here runs from the config and the tensor headers: refusals (unknown architecture,
custom code without --trust-remote-code, no decoder blocks, tensors that do not match) come
before any weight is read.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qtool.errors import FormatError, UnsupportedError

# MoE routers that are nn.Linear modules stay in full precision by default (as every MoE recipe does)
ROUTER_GLOBS = ("*.mlp.gate", "*.block_sparse_moe.gate", "*.shared_expert_gate")


@dataclass(frozen=True)
class Family:
    """What transformers calls the architecture, and the Auto class that builds it."""

    model_type: str
    class_name: str  # e.g. "Qwen3MoeForCausalLM"
    multimodal: bool  # built as image-text-to-text (a language model inside a ...ForConditionalGeneration)


def _mappings():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    return CONFIG_MAPPING_NAMES, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def _names(v) -> list[str]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def family_of(config: dict, where: str, *, trust_remote_code: bool = False) -> Family:
    """The architecture from config.json alone, or a one-line refusal (exit 3)."""
    configs, causal, image_text = _mappings()
    mt = config.get("model_type")
    archs = config.get("architectures") or []
    if mt is not None and not isinstance(mt, str):
        raise FormatError(f"{where}: model_type is {type(mt).__name__} {str(mt)[:40]!r}, not a name")
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise FormatError(f"{where}: architectures should be a list of class names, not {str(archs)[:60]!r}")
    if config.get("auto_map") and mt not in configs:
        if not trust_remote_code:
            raise UnsupportedError(
                f"{where}: architecture {mt!r} {archs} is custom code shipped with the checkpoint (auto_map); "
                "qtool runs it only with --trust-remote-code"
            )
        return Family(str(mt), archs[0] if archs else str(mt), False)
    if not mt:
        raise UnsupportedError(f"{where}: config.json names no model_type; cannot tell the architecture")
    if mt not in configs:
        raise UnsupportedError(f"{where}: unknown architecture {mt!r} {archs}: transformers has no model of this type")
    cands: dict[str, bool] = {}
    for mapping, mm in ((image_text, True), (causal, False)):
        for n in _names(mapping.get(mt, ())):
            cands.setdefault(n, mm)
    # a multimodal type that transformers also lists as a causal LM is built as what it is: image-text-to-text
    if not cands:
        raise UnsupportedError(
            f"{where}: architecture {mt!r} {archs} has no decoder-block structure qtool can quantize "
            "(transformers implements it neither as a causal LM nor as an image-text-to-text model; encoder-only?)"
        )
    if archs and not any(a in cands for a in archs):
        # the checkpoint says what it is: a BertForMaskedLM is an encoder even though BERT has an LM-head variant
        if not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
            raise UnsupportedError(
                f"{where}: {archs[0]} ({mt!r}) has no decoder-block structure qtool can quantize "
                f"(not a causal LM; transformers' causal LM for this type is {next(iter(cands))})"
            )
    name = next((a for a in archs if a in cands), next(iter(cands)))
    return Family(mt, name, cands[name])


def build_meta_model(config: dict, *, folder: Path | None = None, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model from a config.json dict, every parameter on the meta device, eager attention and
    experts (the implementations whose calls calibration can observe)."""
    import transformers
    from transformers import AutoConfig

    where = str(folder / "config.json") if folder is not None else "config.json"
    fam = family_of(config, where, trust_remote_code=trust_remote_code)
    check_module_counts(config, where)
    cfg_dict = {k: v for k, v in config.items() if k not in ("quantization_config", "auto_map")}
    try:
        if trust_remote_code and fam.model_type not in _mappings()[0]:
            if folder is None:
                raise UnsupportedError("--trust-remote-code: the custom code needs the checkpoint folder")
            cfg = AutoConfig.from_pretrained(folder, trust_remote_code=True)
            auto = transformers.AutoModelForCausalLM
            kw = {"trust_remote_code": True}
        else:
            cfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
            auto = transformers.AutoModelForImageTextToText if fam.multimodal else transformers.AutoModelForCausalLM
            kw = {}
        with _quiet_transformers(), torch.device("meta"):
            model = auto.from_config(cfg, dtype=torch.float32, attn_implementation="eager", **kw)
    except (FormatError, UnsupportedError):
        raise
    except Exception as e:  # transformers' own checks of a damaged config: ValueError, ZeroDivisionError, KeyError...
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise FormatError(f"{where}: transformers cannot build {fam.class_name} from it ({type(e).__name__}: {first})") from None
    with contextlib.suppress(Exception):  # older transformers: no experts implementations to choose from
        model.set_experts_implementation("eager")
    return model.eval()


# Config values that make transformers build that many modules: a damaged config.json claiming
# 10^12 layers would otherwise keep the meta-device build busy for hours. No released model comes
# near these bounds (the deepest have ~100 layers, the widest MoE a few hundred experts).
MODULE_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "num_experts", "num_local_experts",
                     "n_routed_experts", "moe_num_experts", "n_shared_experts")
MAX_MODULE_COUNT = 4096


def check_module_counts(config: dict, where: str) -> None:
    """Layer and expert counts of the config (and its nested configs) within MAX_MODULE_COUNT."""
    stack = [config]
    while stack:
        cfg = stack.pop()
        for k, v in cfg.items():
            if isinstance(v, dict):
                stack.append(v)
            elif k in MODULE_COUNT_KEYS and isinstance(v, int) and not isinstance(v, bool) and v > MAX_MODULE_COUNT:
                raise FormatError(f"{where}: {k} {v} is not a plausible model (more than {MAX_MODULE_COUNT}); "
                                  "the file is damaged")


def check_layer_count(config: dict, tensors: dict[str, tuple[int, ...]], where: str) -> None:
    """A config claiming more decoder layers than the checkpoint has numbered blocks is refused
    from the names alone, before transformers builds the extra layers."""
    from qtool.model.source import BLOCK_RE

    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    n = text.get("num_hidden_layers", config.get("num_hidden_layers"))
    if not isinstance(n, int) or isinstance(n, bool):
        return
    found = {int(m.group("index")) for t in tensors if (m := BLOCK_RE.match(t))}
    if found and n > max(found) + 1:
        raise FormatError(f"{where}: num_hidden_layers {n}, but the checkpoint's tensors stop at block {max(found)}")


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' progress bars and advice are not qtool's output."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def revert(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory names -> the checkpoint names transformers saves them under (its own conversion)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5: no conversions, the in-memory layout is the checkpoint's
        return dict(state)
    with _quiet_transformers():
        return revert_weight_conversion(model, dict(state))


@dataclass
class BlockLayout:
    index: int
    memory: str  # module path in the built model, e.g. "model.language_model.layers.3"
    checkpoint: str  # the same block's prefix in the checkpoint, e.g. "language_model.model.layers.3"
    linears: dict[str, str] = field(default_factory=dict)  # checkpoint tensor -> in-memory weight it is (part of)
    experts: dict[str, int] = field(default_factory=dict)  # checkpoint tensor -> expert index (fused in memory)
    fused_experts: list[str] = field(default_factory=list)  # 3-D expert tensors stored fused: kept full precision
    pieces: dict[str, list[str]] = field(default_factory=dict)  # in-memory key (relative) -> checkpoint keys (relative)


@dataclass
class Structure:
    """A checkpoint's architecture as transformers builds it, in checkpoint tensor names."""

    family: Family
    model: torch.nn.Module  # on the meta device
    decoder_layers: str  # in-memory path of the decoder's ModuleList
    blocks: list[BlockLayout]
    expected: dict[str, tuple[int, ...]]  # checkpoint name -> shape, in the layout the checkpoint uses
    tied: set[str]  # checkpoint names a checkpoint may omit (tied to another tensor)
    layout: str  # "saved" (what save_pretrained writes) or "memory"
    to_memory: dict[str, str] = field(default_factory=dict)  # checkpoint tensor -> in-memory tensor (renamed ones)
    pieces: dict[str, list[str]] = field(default_factory=dict)  # in-memory tensor -> checkpoint tensors

    def __post_init__(self) -> None:
        stems = sorted({re.escape(b.checkpoint.rsplit(".", 1)[0]) for b in self.blocks}, key=len, reverse=True)
        self._rx = re.compile(rf"^((?:{'|'.join(stems)})\.\d+)\.")
        self._prefixes = {b.checkpoint for b in self.blocks}

    def block_of(self, name: str) -> str | None:
        """The decoder block (checkpoint prefix) a checkpoint tensor belongs to; None outside blocks
        (embeddings, final norm, head, a vision tower, a projector)."""
        m = self._rx.match(name) if self.blocks else None
        return m.group(1) if m and m.group(1) in self._prefixes else None

    def block_prefixes(self) -> list[str]:
        return [b.checkpoint for b in self.blocks]

    def linears(self) -> list[str]:
        """Every quantizable linear of the decoder blocks (checkpoint tensor names), block order."""
        return [n for b in self.blocks for n in b.linears]

    def expert_names(self) -> set[str]:
        return {n for b in self.blocks for n in b.experts}

    def fused_experts(self) -> list[str]:
        return [n for b in self.blocks for n in b.fused_experts]

    def memory_module(self, module: str) -> str:
        """A checkpoint module name as the built model names it (what loaders' configs target):
        renamed tensors by transformers' conversion, a per-expert piece by its block's prefix."""
        if f"{module}.weight" in self.to_memory:
            return self.to_memory[f"{module}.weight"][: -len(".weight")]
        block = self.block_of(module + ".")
        if block is not None:
            memory = next(b.memory for b in self.blocks if b.checkpoint == block)
            return memory + module[len(block):]
        return module


def _decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    path = next(n for n, m in model.named_modules() if m is decoder)
    lists = [(n, m) for n, m in decoder.named_children() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise UnsupportedError(f"{type(model).__name__}: no decoder-block structure (no list of decoder layers)")
    name, layers = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    return (f"{path}.{name}" if path else name), layers


def _block_layout(model, i: int, memory: str, block: torch.nn.Module, pieces: dict[str, dict[str, tuple]]) -> BlockLayout:
    """Block `i` in checkpoint names; `pieces`: in-memory tensor -> {checkpoint tensor: shape} it is saved as."""
    mem_state = block.state_dict()
    rel = {f"{memory}.{k}": k for k in mem_state}
    renamed = [(key, ck) for key in rel for ck in pieces.get(key, {}) if len(pieces[key]) == 1 and ck.endswith("." + rel[key])]
    ckpt = renamed[0][1][: -len(rel[renamed[0][0]]) - 1] if renamed else memory
    b = BlockLayout(i, memory, ckpt)
    b.pieces = {r: [ck[len(ckpt) + 1:] if ck.startswith(ckpt + ".") else ck for ck in pieces.get(k, {})] for k, r in rel.items()}
    linear_weights = {f"{memory}.{n}.weight" for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    for key in rel:
        if key in linear_weights:
            for k in pieces.get(key, {}):
                b.linears[k] = key
        elif mem_state[rel[key]].ndim == 3 and ".experts." in f".{rel[key]}":  # experts fused in memory
            for k, shape in pieces[key].items():
                if len(shape) == 2:
                    m = re.search(r"\.(\d+)\.", k[len(b.checkpoint):])
                    b.linears[k] = key
                    b.experts[k] = int(m.group(1)) if m else -1
                else:
                    b.fused_experts.append(k)
    return b


def _pieces(model, state: dict[str, torch.Tensor], layout: str) -> dict[str, dict[str, tuple]]:
    """In-memory tensor -> the checkpoint tensors (name: shape) it is stored as. One conversion of
    the whole state dict; renamed tensors keep their identity through it, the few converted ones
    (fused experts) are converted alone to tell which checkpoint tensors they become."""
    if layout == "memory":
        return {k: {k: tuple(v.shape)} for k, v in state.items()}
    saved = revert(model, state)
    ident = {id(t): k for k, t in state.items()}
    out: dict[str, dict[str, tuple]] = {}
    for k2, t in saved.items():
        if id(t) in ident:
            out.setdefault(ident[id(t)], {})[k2] = tuple(t.shape)
    for k, t in state.items():
        if k not in out:
            out[k] = {k2: tuple(v.shape) for k2, v in revert(model, {k: t}).items()}
    return out


def discover(config: dict, tensors: dict[str, tuple[int, ...]] | None = None, *, folder: Path | None = None,
             trust_remote_code: bool = False, where: str = "") -> Structure:
    """The architecture of `config`; with the checkpoint's tensor shapes, the layout it uses."""
    fam = family_of(config, where or str(folder or "config"), trust_remote_code=trust_remote_code)
    if tensors is not None:
        check_layer_count(config, tensors, str(folder / "config.json") if folder is not None else where or "config.json")
    model = build_meta_model(config, folder=folder, trust_remote_code=trust_remote_code)
    path, layers = _decoder_layers(model)
    state = model.state_dict()
    pieces = _pieces(model, state, "saved")
    saved = {ck: shape for p in pieces.values() for ck, shape in p.items()}
    layout = "saved"
    if tensors is not None and sum(k in state for k in tensors) > sum(k in saved for k in tensors):
        layout, pieces = "memory", _pieces(model, state, "memory")
    expected = {ck: shape for p in pieces.values() for ck, shape in p.items()}
    tied = {ck for k in (getattr(model, "all_tied_weights_keys", {}) or {}) for ck in pieces.get(k, {})}
    blocks = [_block_layout(model, i, f"{path}.{i}", blk, pieces) for i, blk in enumerate(layers)]
    to_memory = {ck: k for k, p in pieces.items() if len(p) == 1 for ck in p}
    return Structure(fam, model, path, blocks, expected, tied, layout, to_memory, {k: list(p) for k, p in pieces.items()})


def check_tensors(structure: Structure, tensors: dict[str, tuple[int, ...]], where: str) -> None:
    """The checkpoint's tensors against the architecture: missing, extra or mis-shaped, named in one line."""
    from qtool.model.header_check import check_tensor_names

    ignore = [p for p in (getattr(structure.model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    # computed buffers some older checkpoints still carry (`...rotary_emb.inv_freq`): transformers ignores them
    buffers = {n.rsplit(".", 1)[-1] for n, _ in structure.model.named_buffers()}
    check_tensor_names(structure.family.class_name, structure.expected, structure.tied, buffers, tensors, where, ignore)


def is_router(module: str) -> bool:
    return any(fnmatch.fnmatchcase(module, g) for g in ROUTER_GLOBS)


def init_buffers(model: torch.nn.Module) -> None:
    """Computed buffers (rotary frequencies, Gemma's embedding scale...) are not in checkpoints:
    moved off the meta device and filled by the model's own initialiser, before any weight is
    loaded (the initialiser touches only meta parameters then)."""
    for _, mod in model.named_modules():
        metas = [b for b, t in mod._buffers.items() if t is not None and t.is_meta]
        if metas:
            for b in metas:
                mod._buffers[b] = torch.empty_like(mod._buffers[b], device="cpu")
            model._init_weights(mod)


def load_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], layout: str) -> set[str]:
    """Checkpoint tensors (checkpoint names) into the built model, through transformers' own
    loading conversion (renames, expert fusion), as float32. -> the in-memory keys loaded."""
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.modeling_utils import LoadStateDictConfig

    mapping = get_model_conversion_mapping(model) if layout == "saved" else []
    with _quiet_transformers():
        info, _ = convert_and_load_state_dict_in_model(model, tensors, LoadStateDictConfig(weight_mapping=mapping, dtype=torch.float32))
    bad = sorted(info.unexpected_keys) + sorted(info.mismatched_keys) + sorted(info.conversion_errors)
    if bad:
        raise FormatError(f"{bad[0]}: transformers could not load this tensor into {type(model).__name__}")
    return set(model.state_dict()) - set(info.missing_keys)
