"""Calibration data: a `--dataset` spec becomes `samples` windows of `seq_len` tokens.

What a spec can be (the first rule that applies wins):

1. An existing file. `.txt` is one document, of which only the `part` half is used
   (`qtool.evaluate.split_text`: "calib" = first half, the default, so calibration never sees the
   text that `qtool.evaluate` scores; "eval" and "all" exist for experiments). `.jsonl`, `.json`
   (a list of records, or JSON Lines) and `.parquet` hold records; each record gives one document
   from its text field (`text_field`, else the first of `TEXT_FIELDS` present).
2. The name of a recipe in `calib_data/recipes.json` (`wikitext2`, `c4`, `pile-10k`, `ultrachat`):
   a Hub dataset with its config, split, text field and chat flag written down once. Arguments
   given to `load_calibration` override the recipe's values.
3. Anything else that looks like a path (a known suffix, a folder, `./`, `/`, `~`): an error.
4. Otherwise a Hub dataset id, read with `datasets.load_dataset(id, config, split=...,
   streaming=True)`; streaming reads only as many records as the windows need.

A document that is a list of chat messages (`[{"role", "content"}, ...]`, ShareGPT's
`{"from", "value"}` too) is rendered with `tokenizer.apply_chat_template(messages, tokenize=False)`
when the recipe or `chat_template=True` says so, or, with `chat_template=None`, whenever the first
record's field holds messages; with `chat_template=False` its turns are joined by line breaks.

Window selection (the choice, and why): documents are tokenized (no special tokens added) and
concatenated into one stream, an EOS token between documents (a recipe may name another
separator), until the stream holds `POOL_FACTOR` times the tokens the windows need or the source
ends. From that pool, `samples` non-overlapping windows of `seq_len` are cut at offsets drawn from
a `torch.Generator` seeded with `seed`: same seed, same windows; every placement is possible. A
window may span a document boundary, as in GPTQ's and AWQ's reference code; cutting from a stream
rather than sampling whole documents wastes no text on short documents and needs no padding.
Library code: nothing here prints; every failure is a typed error with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from qtool.errors import FormatError, UnsupportedError, UsageError
from qtool.evaluate import PARTS, read_text, split_text

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
TEXT_FIELDS = ("text", "content", "messages", "conversations", "conversation", "document", "body")
POOL_FACTOR = 4  # tokens read = 4 x samples x seq_len: room for the seed to matter, little reading
TOKENIZE_BATCH = 64  # documents per tokenizer call
RECIPES_PACKAGE = "qtool_calib_data"  # calib_data/ as installed (pyproject's package-dir)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Recipe:
    """One entry of calib_data/recipes.json: how to read a well-known Hub dataset."""

    name: str
    dataset: str  # Hub dataset id
    split: str = "train"
    config: str | None = None
    data_files: dict[str, str] | None = None
    text_field: str | None = None
    chat_template: bool = False
    separator: str = "eos"  # between documents: "eos" (the tokenizer's EOS token) or literal text
    description: str = ""
    licence: str = ""


@dataclass(frozen=True)
class CalibrationSet:
    """The token windows a calibration method runs the model on, and where they came from."""

    input_ids: torch.Tensor  # [samples, seq_len] int64
    tokens_used: int  # samples * seq_len: tokens inside the windows
    source: dict  # provenance: what was read, how, and how much (JSON-serialisable)
    spec: str  # the `--dataset` value as given

    @property
    def samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


@dataclass
class _Source:
    """Records to read documents from, and how to describe and read them."""

    where: str  # names the source in messages: "data.jsonl", "dataset 'org/name' (split train)"
    records: Iterator[Any]  # dicts, or plain strings (documents)
    describe: dict
    text_field: str | None = None
    chat_template: bool | None = None
    separator: str = "eos"


# -- recipes -------------------------------------------------------------------------------------
def load_recipes() -> dict[str, Recipe]:
    """The recipes shipped in calib_data/recipes.json, by name."""
    try:
        text = resources.files(RECIPES_PACKAGE).joinpath("recipes.json").read_text(encoding="utf-8")
        entries = json.loads(text)["recipes"]
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(f"{RECIPES_PACKAGE}/recipes.json: unreadable ({type(e).__name__}: {e})") from e
    return {name: _recipe(name, entry) for name, entry in entries.items()}


def _recipe(name: str, entry: dict) -> Recipe:
    known = set(Recipe.__dataclass_fields__) - {"name"}
    unknown = sorted(set(entry) - known)
    if unknown or "dataset" not in entry:
        what = f"unknown keys {', '.join(unknown)}" if unknown else "no 'dataset'"
        raise FormatError(f"recipes.json: recipe {name!r} has {what}; allowed keys: {', '.join(sorted(known))}")
    return Recipe(name=name, **entry)


# -- the entry point -----------------------------------------------------------------------------
def load_calibration(
    spec: str,
    tokenizer,
    *,
    samples: int,
    seq_len: int,
    seed: int = 0,
    dataset_config: str | None = None,
    split: str | None = None,
    text_field: str | None = None,
    chat_template: bool | None = None,
    part: str = "calib",
) -> CalibrationSet:
    """`samples` windows of `seq_len` tokens from `spec` (see the module doc), reproducible with `seed`."""
    _check_sizes(samples, seq_len, part)
    src = open_source(spec, dataset_config=dataset_config, split=split, text_field=text_field,
                      chat_template=chat_template, part=part)
    info, texts = _documents(src, tokenizer)
    need = samples * seq_len
    pool, docs = _token_pool(texts, tokenizer, _separator_ids(tokenizer, src.separator), POOL_FACTOR * need)
    if pool.numel() < need:
        raise FormatError(_too_few(src.where, pool.numel(), samples, seq_len))
    source = {**src.describe, **info, "separator": src.separator, "documents": docs,
              "tokens_available": pool.numel(), "samples": samples, "seq_len": seq_len, "seed": seed,
              "windows": "non-overlapping, seeded offsets", "tokenizer": getattr(tokenizer, "name_or_path", None)}
    return CalibrationSet(pick_windows(pool, samples, seq_len, seed), need, source, spec)


def _check_sizes(samples: int, seq_len: int, part: str) -> None:
    if samples < 1:
        raise UsageError(f"--samples {samples}: need at least 1 calibration sample")
    if seq_len < 2:
        raise UsageError(f"--seq-len {seq_len}: need at least 2 tokens per sample")
    if part not in PARTS:
        raise UsageError(f"part {part!r}: expected one of {', '.join(PARTS)}")


def _too_few(where: str, have: int, samples: int, seq_len: int) -> str:
    fits = []
    if have // seq_len >= 1:
        fits.append(f"--samples {have // seq_len} at --seq-len {seq_len}")
    if have // samples >= 2:
        fits.append(f"--seq-len {have // samples} at --samples {samples}")
    advice = "; use " + " or ".join(fits) if fits else "; give more text"
    return f"{where}: {have:,} tokens, too few for {samples} samples x {seq_len} tokens ({samples * seq_len:,}){advice}"


def pick_windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`samples` non-overlapping windows of `seq_len` from the 1-D stream `ids`, in stream order.

    The free tokens (`len(ids) - samples * seq_len`) are split into gaps before the windows at
    seeded random sizes: sorted uniform draws in [0, free] plus each window's own offset."""
    free = ids.numel() - samples * seq_len
    assert free >= 0, "caller checks the pool is large enough"
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randint(0, free + 1, (samples,), generator=gen).sort().values
    starts = cuts + torch.arange(samples) * seq_len
    return ids[starts[:, None] + torch.arange(seq_len)]


# -- where the records come from -----------------------------------------------------------------
def open_source(
    spec: str,
    *,
    dataset_config: str | None = None,
    split: str | None = None,
    text_field: str | None = None,
    chat_template: bool | None = None,
    part: str = "calib",
) -> _Source:
    """Resolve a `--dataset` spec to its records (nothing is tokenized yet)."""
    path = Path(spec).expanduser()
    if path.is_file():
        if dataset_config is not None or split is not None:
            flag = "--dataset-config" if dataset_config is not None else "--split"
            raise UsageError(f"{flag} applies to Hub datasets; {spec} is a local file")
        src = _open_file(path, part)
    elif spec in (recipes := load_recipes()):
        src = _open_recipe(recipes[spec], dataset_config, split)
    elif path.is_dir():
        raise FormatError(f"{spec}: a folder; give a calibration file ({', '.join(FILE_SUFFIXES)})")
    elif _looks_like_path(spec):
        raise FormatError(f"{spec}: no such file (a calibration file is {', '.join(FILE_SUFFIXES)})")
    else:
        src = _open_hub(spec, dataset_config, split or "train", None)
    if text_field is not None:
        src.text_field = text_field
    if chat_template is not None:
        src.chat_template = chat_template
    return src


def _looks_like_path(spec: str) -> bool:
    return (spec.lower().endswith(FILE_SUFFIXES) or spec.startswith((".", "/", "~"))
            or spec.count("/") > 1 or "\\" in spec)


def _open_file(path: Path, part: str) -> _Source:
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        kind = suffix or "(none)"
        raise FormatError(f"{path}: unknown calibration file type {kind!r}; use {', '.join(FILE_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise FormatError(f"{path}: empty file; no text to calibrate on")
    describe = {"kind": "file", "path": str(path.resolve()), "format": suffix[1:], "sha256": _sha256(path)}
    if suffix == ".txt":
        text = _text_part(path, part)
        where = f"{path} ({part} half)" if part != "all" else str(path)
        return _Source(where, iter([text]), {**describe, "part": part})
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    return _Source(str(path), readers[suffix](path), describe)


def _text_part(path: Path, part: str) -> str:
    try:
        text = read_text(path)
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: unreadable as UTF-8 text ({type(e).__name__})") from e
    if part != "all":
        text = split_text(text)[0 if part == "calib" else 1]
    if not text.strip():
        raise FormatError(f"{path}: the {part} half is empty; no text to calibrate on")
    return text


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_jsonl(path: Path) -> Iterator[Any]:
    with open(path, encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as e:
                    raise FormatError(f"{path}: line {number} is not JSON ({e})") from e


def _read_json(path: Path) -> Iterator[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved as .json, as `datasets` also accepts
            return _read_jsonl(path)
        raise FormatError(f"{path}: not JSON ({e})") from e
    if not isinstance(data, list):
        raise FormatError(f"{path}: expected a list of records at the top level, found {type(data).__name__}")
    return iter(data)


def _read_parquet(path: Path) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        for batch in table.iter_batches(batch_size=TOKENIZE_BATCH):
            yield from batch.to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise FormatError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from e


def _open_recipe(recipe: Recipe, config: str | None, split: str | None) -> _Source:
    config = config if config is not None else recipe.config
    split = split if split is not None else recipe.split
    src = _open_hub(recipe.dataset, config, split, recipe.data_files)
    src.describe = {**src.describe, "kind": "recipe", "recipe": recipe.name, "licence": recipe.licence}
    src.text_field, src.chat_template, src.separator = recipe.text_field, recipe.chat_template, recipe.separator
    return src


def _open_hub(dataset: str, config: str | None, split: str, data_files: dict | None) -> _Source:
    """The real `datasets.load_dataset` call, streamed; its failures become one-line FormatErrors."""
    import datasets

    where = f"dataset {dataset!r}" + (f" (config {config}, split {split})" if config else f" (split {split})")
    try:
        stream = datasets.load_dataset(dataset, config, split=split, data_files=data_files, streaming=True)
    except Exception as e:  # noqa: BLE001 - third-party boundary: datasets/huggingface_hub/httpx raise many types
        raise FormatError(_hub_failure(dataset, where, e)) from e
    describe = {"kind": "hub", "dataset": dataset, "config": config, "split": split, "data_files": data_files}
    return _Source(where, _guarded(stream, dataset, where), describe)


def _guarded(stream: Iterable[Any], dataset: str, where: str) -> Iterator[Any]:
    """Records of a streamed dataset; a failure while streaming is a FormatError too."""
    try:
        yield from stream
    except Exception as e:  # noqa: BLE001 - network and decoding errors surface here when streaming
        raise FormatError(_hub_failure(dataset, where, e)) from e


def _hub_failure(dataset: str, where: str, e: Exception) -> str:
    from datasets import config as ds_config
    from datasets.exceptions import DatasetNotFoundError

    local = "give a local .txt, .jsonl, .json or .parquet file instead"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if ds_config.HF_HUB_OFFLINE or "OfflineModeIsEnabled" in first:
        return f"{where}: cannot be read, the Hub is offline (HF_HUB_OFFLINE=1); go online, or {local}"
    if isinstance(e, DatasetNotFoundError):
        return f"{where}: not found on the Hub (or private, or gated); check the id, or {local}"
    if isinstance(e, ValueError):
        return f"{where}: {first}; check --dataset-config and --split"
    return f"{where}: cannot be read ({type(e).__name__}: {first}); check the id, or {local}"


# -- records -> documents -> tokens --------------------------------------------------------------
def _documents(src: _Source, tokenizer) -> tuple[dict, Iterator[str]]:
    """(what was decided: text field, chat template), the documents as text."""
    records = src.records
    first = next(records, None)
    if first is None:
        raise FormatError(f"{src.where}: no records; no text to calibrate on")
    if isinstance(first, str) and src.text_field is not None:
        raise UsageError(f"{src.where}: --text-field {src.text_field} does not apply, its documents are plain text")
    name = None if isinstance(first, str) else _pick_field(first, src.text_field, src.where)
    value = first if name is None else first[name]
    chat = _is_messages(value) if src.chat_template is None else src.chat_template
    if chat and not _is_messages(value):
        what = f"field {name!r}" if name else "it"
        raise UsageError(f"{src.where}: chat template asked for, but {what} holds {type(value).__name__}, "
                         "not a list of messages")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise UnsupportedError(f"{src.where}: the tokenizer has no chat template for these messages; "
                               "pass --no-chat-template to join the turns as plain text")
    texts = (_to_text(rec, name, chat, tokenizer, src.where, i) for i, rec in enumerate(chain([first], records)))
    info = {"text_field": name, "chat_template": chat} if name else {"chat_template": chat}
    return info, (t for t in texts if t)


def _pick_field(record: Any, wanted: str | None, where: str) -> str:
    if not isinstance(record, dict):
        raise FormatError(f"{where}: records are {type(record).__name__}, "
                          "expected objects with a text field, or strings")
    available = ", ".join(record) or "(none)"
    if wanted is not None:
        if wanted not in record:
            raise FormatError(f"{where}: no text field {wanted!r}; available: {available}; pass --text-field NAME")
        return wanted
    for name in TEXT_FIELDS:
        if name in record:
            return name
    raise FormatError(f"{where}: no text field (looked for {', '.join(TEXT_FIELDS)}); "
                      f"available: {available}; pass --text-field NAME")


def _is_messages(value: Any) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, dict) and ("role" in m or "from" in m) for m in value))


def _to_text(record: Any, name: str | None, chat: bool, tokenizer, where: str, index: int) -> str:
    if name is not None and (not isinstance(record, dict) or name not in record):
        raise FormatError(f"{where}: record {index} has no field {name!r}")
    value = record if name is None else record[name]
    if value is None or isinstance(value, str):
        return value or ""
    if not _is_messages(value):
        raise FormatError(f"{where}: record {index} field {name!r} holds {type(value).__name__}, "
                          "not text or a list of chat messages")
    messages = [_message(m) for m in value]
    if not chat:
        return "\n".join(str(m["content"]) for m in messages)
    return _render_chat(messages, tokenizer, where, index)


def _message(m: dict) -> dict:
    """A chat message as {"role", "content"}; ShareGPT's {"from", "value"} is translated."""
    if "role" in m:
        return m
    return {"role": SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m.get("value", "")}


def _render_chat(messages: list[dict], tokenizer, where: str, index: int) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except (TemplateError, ValueError, TypeError, KeyError) as e:
        raise FormatError(f"{where}: record {index}: the chat template rejects its messages ({e})") from e


def _separator_ids(tokenizer, separator: str) -> list[int]:
    if separator == "eos":
        eos = getattr(tokenizer, "eos_token_id", None)
        return [] if eos is None else [int(eos)]
    return _encode(tokenizer, [separator])[0] if separator else []


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _token_pool(texts: Iterable[str], tokenizer, sep: list[int], budget: int) -> tuple[torch.Tensor, int]:
    """Documents tokenized and joined by `sep` until `budget` tokens or the end: (1-D int64, documents)."""
    pieces: list[list[int]] = []
    total = docs = 0
    for batch in _batches(texts, TOKENIZE_BATCH):
        for ids in _encode(tokenizer, batch):
            if not ids:
                continue
            if pieces and sep:
                pieces.append(sep)
                total += len(sep)
            pieces.append(ids)
            total += len(ids)
            docs += 1
        if total >= budget:
            break
    return torch.tensor(list(chain.from_iterable(pieces)), dtype=torch.long), docs
