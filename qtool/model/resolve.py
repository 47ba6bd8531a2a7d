"""Turn the MODEL argument (folder, `.safetensors`/`.gguf` file, or Hub id) into a CheckpointSource."""

from __future__ import annotations

import re
from pathlib import Path

from qtool.errors import FormatError
from qtool.model.safetensors_source import AUX_FILES, SafetensorsSource, check_not_pickle_file, read_config
from qtool.model.source import CheckpointSource

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a quantization run needs from a Hub repository: weights, config, tokenizer. Never pickles
# unless asked (and then only for repositories that have no safetensors).
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", *AUX_FILES]


def is_hub_id(model: str) -> bool:
    return bool(HUB_ID_RE.match(model)) and not Path(model).exists()


def download_from_hub(repo_id: str, revision: str | None, token: str | None, allow_pickle: bool = False) -> Path:
    """Download only the files a run needs; returns the local snapshot folder."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    patterns = list(HUB_PATTERNS)
    try:
        if allow_pickle:
            files = HfApi().list_repo_files(repo_id, revision=revision, token=token)
            if not any(f.endswith(".safetensors") for f in files):
                patterns += ["*.bin"]
        folder = Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns))
        if not allow_pickle and not any(folder.glob("*.safetensors")):
            files = HfApi().list_repo_files(repo_id, revision=revision, token=token)
            pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
            if pickles:
                raise FormatError(
                    f"{repo_id}: only pickle weights ({pickles[0]}); pickle can run code on load, "
                    "so qtool refuses it unless you pass --allow-pickle"
                )
        return folder
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise FormatError(f"{repo_id}: not found on the Hub ({type(e).__name__}); check the id, --revision and HF_TOKEN") from None
    except LocalEntryNotFoundError:
        raise FormatError(f"{repo_id}: not in the local Hub cache and the Hub cannot be reached (offline?)") from None
    except HfHubHTTPError as e:
        raise FormatError(f"{repo_id}: Hub request failed: {str(e).splitlines()[0]}") from None


def open_source(
    model: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    allow_pickle: bool = False,
    dequantize_dtype: torch.dtype | None = None,
) -> CheckpointSource:
    """`dequantize_dtype`: the dtype a checkpoint read dequantized (DequantizedSource) is held in;
    default its own (float32 for a writer that re-quantizes it, so the error it reports is against the
    exact dequantization, not a bf16 rounding of it)."""
    path = Path(model).expanduser()
    if not path.exists():
        if is_hub_id(model):
            path = download_from_hub(model, revision, token, allow_pickle)
        else:
            raise FormatError(f"{model}: no such file or folder (nor a Hub id like org/name)")
    if path.is_file() and path.suffix == ".gguf":
        from qtool.model.gguf_source import GGUFSource

        return GGUFSource(path)
    if path.is_dir():
        from qtool.model.onthefly_source import DequantizedSource, onthefly_kind

        kind = onthefly_kind(path)  # hqq / optimum-quanto / Quark layouts: read dequantized
        if kind is not None:
            return DequantizedSource(path, kind)
    if path.is_file():
        check_not_pickle_file(path, allow_pickle)
        if path.suffix != ".safetensors":
            raise FormatError(f"{path}: not a model file qtool reads (.safetensors, .gguf, or a folder)")
    from qtool.model.dequantized_source import DequantizedSource, dequantizable

    if path.is_dir() and (path / "config.json").is_file() and dequantizable(read_config(path)):
        return DequantizedSource(path, dequantize_dtype)  # bitsandbytes, torchao, FP8, EETQ layouts: read dequantized
    return SafetensorsSource(path, allow_pickle=allow_pickle)
