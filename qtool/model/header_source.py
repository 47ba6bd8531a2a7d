"""A Hub checkpoint known from its headers alone, for `qtool quantize ... --dry-run`: the small
files (config.json, the shard index, tokenizer and generation files) are downloaded into the Hub
cache as a normal run would, and each `.safetensors` header is read with two HTTP Range requests
(qtool/inspect/safetensors.py `remote_header`), so no tensor data moves. Tensor names, shapes and
dtypes are those a download would give; `get_tensor` is never called by a dry run and refuses."""

from __future__ import annotations

from pathlib import Path

import torch

from qtool.errors import FormatError, UnsupportedError
from qtool.model.source import CheckpointSource, TensorMeta


class HubHeaderSource(CheckpointSource):
    def __init__(self, folder: Path, config: dict, metas: list[TensorMeta], files: dict[str, int], repo_id: str) -> None:
        self.path, self.folder, self.config = folder, folder, config
        self._metas, self.files, self.repo_id = metas, files, repo_id

    def tensors(self) -> list[TensorMeta]:
        return self._metas

    def get_tensor(self, name: str) -> torch.Tensor:
        raise UnsupportedError(f"{self.repo_id}: {name}: a dry run reads headers only, never tensor data")

    def write_aux_files(self, out_dir: Path) -> list[str]:
        from qtool.model.safetensors_source import SafetensorsSource

        return SafetensorsSource.write_aux_files(self, out_dir)  # type: ignore[arg-type]

    def input_files(self) -> list[Path]:
        return []  # nothing local to hash: the weights were not downloaded

    @property
    def weight_bytes(self) -> int:
        return sum(self.files.values())


def open_hub_headers(repo_id: str, *, revision: str | None = None, token: str | None = None,
                     allow_pickle: bool = False) -> CheckpointSource:
    """`repo_id` as a HubHeaderSource (offline: the cached snapshot an earlier run left, opened as usual)."""
    from huggingface_hub import HfApi, constants, snapshot_download

    from qtool.inspect.safetensors import INDEX_FILE, _hub_errors, hub_checkpoint
    from qtool.model.resolve import HUB_PATTERNS, open_source
    from qtool.model.safetensors_source import read_config

    if constants.is_offline_mode():
        return open_source(repo_id, revision=revision, token=token, allow_pickle=allow_pickle)
    with _hub_errors(repo_id):
        names = [s.rfilename for s in HfApi().model_info(repo_id, revision=revision, token=token).siblings or []]
    if not any(n.endswith(".safetensors") for n in names):
        pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
        if pickles and not allow_pickle:
            raise FormatError(f"{repo_id}: only pickle weights ({pickles[0]}); pickle can run code on load, "
                              "so qtool refuses it unless you pass --allow-pickle")
        if pickles:
            raise UnsupportedError(f"{repo_id}: only pickle weights ({pickles[0]}): a dry run reads headers, and pickles "
                                   "have none; run without --dry-run (it downloads them)")
    ck = hub_checkpoint(repo_id, revision, token)
    small = [p for p in HUB_PATTERNS if not p.startswith("*")] + [INDEX_FILE]
    with _hub_errors(repo_id):
        folder = Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=small))
    from qtool.model.safetensors_header import _TORCH_NAMES

    metas = [TensorMeta(t.name, t.shape, getattr(torch, _TORCH_NAMES[t.dtype])) for t in ck.tensors]
    return HubHeaderSource(folder, read_config(folder), metas, dict(ck.files), repo_id)
