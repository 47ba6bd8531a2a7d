"""What a checkpoint holds, read from its headers: per-tensor types, bits, shapes, parameter counts
and bytes; totals; the detected format and method; the memory needed to run it.

Works on a folder (plain or compressed-tensors safetensors, single file or sharded), one
`.safetensors` or `.gguf` file, or a Hub id. For a Hub id only `config.json` (and a shard index,
if any) is downloaded; each `.safetensors` header is read with two HTTP Range requests (its 8-byte
length, then exactly its JSON), so no tensor data moves. huggingface_hub's own
`get_safetensors_metadata` always fetches the first 100 kB of each file, which for a small shard
is tensor data too, so we issue the ranges ourselves through its session, URL and auth helpers.

Counting: a parameter is one logical weight element. A pack-quantized module counts the elements
of its `weight_shape`, not of the int32 `weight_packed`; scales and zero points are stored bits of
that weight (they enter its bits per weight) but not parameters; `weight_shape`/`g_idx` and
activation/KV scales are bookkeeping (bytes, but neither parameters nor weight bits).
"""

from __future__ import annotations

from pathlib import Path

from qtool.errors import FormatError, UsageError
from qtool.inspect.calibration import calibration_file_summary
from qtool.inspect.gguf import gguf_report, gguf_summary
from qtool.inspect.report import KIND_LABELS, KINDS, InspectReport, KVCache, TensorReport, kv_cache_from_config, layer_kind
from qtool.inspect.safetensors import hub_checkpoint, local_checkpoint, safetensors_report


# -- entry point ---------------------------------------------------------------------------------


def inspect_model(target: str, *, revision: str | None = None, token: str | None = None,
                  ctx: int = 4096, batch: int = 1) -> InspectReport:
    """Inspect a folder, a `.safetensors`/`.gguf` file or a Hub id, reading headers only."""
    if ctx < 1 or batch < 1:
        raise UsageError(f"--ctx and --batch must be at least 1 (got ctx={ctx}, batch={batch})")
    path = Path(target).expanduser()
    if path.exists():
        gguf_file = path if path.suffix == ".gguf" and path.is_file() else _lone_gguf(path)
        if gguf_file is not None:
            return gguf_report(gguf_file, ctx, batch)
        from qtool.model.safetensors_header import is_hqq_folder

        if is_hqq_folder(path) and not any(path.glob("*.safetensors")):
            from qtool.inspect.onthefly import hqq_report

            return hqq_report(path, ctx, batch)
        return safetensors_report(local_checkpoint(path), ctx, batch)
    from qtool.model.resolve import is_hub_id  # here: it imports the torch-backed sources

    if is_hub_id(target):
        return safetensors_report(hub_checkpoint(target, revision, token), ctx, batch)
    raise FormatError(f"{target}: no such file or folder (nor a Hub id like org/name)")


def _lone_gguf(path: Path) -> Path | None:
    """A folder whose only weights are one GGUF file stands for that file."""
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    ggufs = sorted(path.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


__all__ = ["KINDS", "KIND_LABELS", "InspectReport", "KVCache", "TensorReport", "calibration_file_summary", "gguf_summary",
           "inspect_model", "kv_cache_from_config", "layer_kind"]
