"""What qtool can do with an architecture, for `qtool inspect`, without importing torch or
transformers (inspect must stay a header read: well under a second).

Whether transformers implements a `model_type` as a causal LM (or image-text-to-text) is read from
transformers' own auto-mapping tables, parsed from their source with `ast` (the same tables
`AutoModelForCausalLM` uses); the GGUF column from the writer's ARCHS table, parsed likewise. The
quantize/calibrate paths themselves use qtool/model/structure.py, which builds the model."""

from __future__ import annotations

import ast
import importlib.util
from functools import lru_cache
from pathlib import Path

MAPPINGS = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES")
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _module_file(dotted: str) -> Path | None:
    top, _, rest = dotted.partition(".")
    spec = importlib.util.find_spec(top)  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0], *rest.split(".")).with_suffix(".py")
    return path if path.is_file() else None


def _dict_keys(path: Path | None, names: tuple[str, ...]) -> dict[str, set[str]]:
    return {n: set(d) for n, d in _dicts(path, names).items()}


def _strings(node) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List)):
        return set().union(*(_strings(e) for e in node.elts)) if node.elts else set()
    return set()


def _dicts(path: Path | None, names: tuple[str, ...]) -> dict[str, dict[str, set[str]]]:
    """{table name: {key: class names}} of the dict literals `names` assigned in `path`."""
    out: dict[str, dict[str, set[str]]] = {n: {} for n in names}
    if path is None:
        return out
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name) and t.id in names and node.value is not None:
                value = node.value.args[0] if isinstance(node.value, ast.Call) and node.value.args else node.value
                pairs = []
                if isinstance(value, ast.Dict):
                    pairs = list(zip(value.keys, value.values))
                elif isinstance(value, (ast.List, ast.Tuple)):  # OrderedDict([("llama", "..."), ...])
                    pairs = [(e.elts[0], e.elts[1]) for e in value.elts if isinstance(e, ast.Tuple) and len(e.elts) == 2]
                for k, v in pairs:
                    if isinstance(k, ast.Constant) and isinstance(k.value, str):
                        out[t.id].setdefault(k.value, set()).update(_strings(v))
    return out


@lru_cache(maxsize=1)
def _lm_classes() -> dict[str, frozenset[str]]:
    """model_type -> the classes transformers builds it as (causal LM or image-text-to-text)."""
    out: dict[str, set[str]] = {}
    for table in _dicts(_module_file("transformers.models.auto.modeling_auto"), MAPPINGS).values():
        for k, v in table.items():
            out.setdefault(k, set()).update(v)
    return {k: frozenset(v) for k, v in out.items()}


def transformers_model_types() -> frozenset[str]:
    """model_types transformers builds as a causal LM or an image-text-to-text model."""
    return frozenset(_lm_classes())


@lru_cache(maxsize=1)
def gguf_model_types() -> frozenset[str]:
    return frozenset(_dict_keys(_module_file("qtool.formats.gguf.metadata"), ("ARCHS",))["ARCHS"])


def light_capabilities(config: dict | None) -> dict:
    """{"family", "quantize", "gguf", "calibration"} from config.json alone (see the module docstring)."""
    if not isinstance(config, dict) or not config:
        return {}
    mt = config.get("model_type")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    archs = config.get("architectures")
    name = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else str(mt)
    if not isinstance(mt, str):
        return {"family": name, "quantize": "no (config.json has no model_type)", "gguf": "no", "calibration": "no"}
    if config.get("auto_map"):
        return {"family": f"{name} ({mt}, custom code)", "quantize": "with --trust-remote-code", "gguf": "no",
                "calibration": "with --trust-remote-code"}
    known = transformers_model_types()
    if known and mt not in known:
        why = f"no ({mt!r} is not a causal LM transformers implements)"
        return {"family": f"{name} ({mt})", "quantize": why, "gguf": "no", "calibration": "no"}
    classes = _lm_classes().get(mt, frozenset())
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    if archs and not any(a in classes for a in archs) and not any(
            a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        # as qtool/model/structure.py decides: a BertForMaskedLM is an encoder although BERT has an LM-head variant
        return {"family": f"{name} ({mt})", "quantize": "no (not a causal LM: no decoder-block structure)", "gguf": "no",
                "calibration": "no"}
    layers = text.get("num_hidden_layers")
    moe = any(isinstance(text.get(k), int) and text.get(k) > 0 for k in MOE_KEYS)
    family = f"{name} ({mt}" + (f", {layers} decoder blocks" if isinstance(layers, int) else "") + (", MoE" if moe else "")
    family += (", multimodal: language model quantized" if text is not config else "") + ")"
    gguf_mt = text.get("model_type", mt) if text is not config else mt
    gguf = "yes" if mt in gguf_model_types() or gguf_mt in gguf_model_types() else f"no (no GGUF mapping for {mt!r} yet)"
    return {"family": family, "quantize": "yes", "gguf": gguf, "calibration": "yes"}
