"""Perplexity of a causal language model on held-out text.

The protocol, kept identical for every model we compare (bf16 baseline, our outputs loaded by
transformers, peers' outputs):

1. Read the text file (UTF-8, a leading BOM dropped) and keep one part of it. For WikiText-2
   validation, `split_text` cuts it in two at the first line break after the middle: calibration
   uses the first half, evaluation the second, so a quality figure is never measured on
   calibration text.
2. Tokenize that part with the model's own tokenizer, without special tokens, as one stream.
3. Cut the stream into **non-overlapping** windows of `seq_len` tokens, from its start; the ragged
   tail is dropped and `max_windows` keeps only the first windows (for speed).
4. Score every window independently (no context carried across windows): the mean negative
   log-likelihood of tokens 2..seq_len of each window given the tokens before them, averaged over
   all scored tokens of all windows. Perplexity = exp(mean NLL).

Everything is deterministic (fixed windows, no sampling) and runs under `torch.no_grad()`.
Works on any `transformers` causal-LM object (anything whose forward takes `input_ids` and returns
`.logits` of shape [batch, seq, vocab]).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

DEFAULT_SEQ_LEN = 512
DEFAULT_BATCH_SIZE = 4
PARTS = ("calib", "eval", "all")


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float  # nats per scored token
    scored_tokens: int  # windows * (seq_len - 1)
    windows: int
    seq_len: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def read_text(path: Path | str) -> str:
    """The whole file as text; a UTF-8 byte-order mark is dropped."""
    return Path(path).read_text(encoding="utf-8-sig")


def split_text(text: str) -> tuple[str, str]:
    """(first half, second half), cut at the first line break at or after the middle character.

    The first half is for calibration, the second for evaluation; they never overlap."""
    mid = len(text) // 2
    cut = text.find("\n", mid)
    cut = len(text) if cut < 0 else cut + 1
    return text[:cut], text[cut:]


def text_part(path: Path | str, part: str = "eval") -> str:
    """`part` of a text file: "calib" (first half), "eval" (second half) or "all"."""
    if part not in PARTS:
        raise ValueError(f"part {part!r}: expected one of {', '.join(PARTS)}")
    text = read_text(path)
    if part == "all":
        return text
    calib, held_out = split_text(text)
    return calib if part == "calib" else held_out


def token_windows(tokenizer, text: str, seq_len: int = DEFAULT_SEQ_LEN, max_windows: int | None = None) -> torch.Tensor:
    """Tokenize `text` as one stream and cut it into non-overlapping windows: [n, seq_len] int64.

    The ragged tail is dropped; with `max_windows`, only the first `max_windows` windows are kept."""
    if seq_len < 2:
        raise ValueError(f"seq_len {seq_len}: need at least 2 tokens per window")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens: not enough for one window of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


def window_nll(model, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (nats, float64) of each window in `batch` [b, seq_len]."""
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
    targets = batch[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.reshape(targets.shape).double().sum(dim=1)


def perplexity(
    model,
    windows: torch.Tensor,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int, int], None] = lambda done, total: None,
) -> PerplexityResult:
    """Perplexity of `model` over `windows` [n, seq_len], scored in batches of `batch_size` windows.

    `on_batch(done, total)` is called after each batch (windows done, windows in all)."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows of shape {tuple(windows.shape)}: expected [n, seq_len >= 2]")
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start : start + batch_size].to(device)
                total += float(window_nll(model, batch).sum())
                on_batch(min(start + batch_size, windows.shape[0]), windows.shape[0])
    finally:
        model.train(was_training)
    n, seq_len = windows.shape
    scored = n * (seq_len - 1)
    mean = total / scored
    return PerplexityResult(math.exp(mean), mean, scored, n, seq_len, time.perf_counter() - t0)


def eval_windows(
    tokenizer,
    text_path: Path | str,
    part: str = "eval",
    seq_len: int = DEFAULT_SEQ_LEN,
    max_windows: int | None = None,
) -> torch.Tensor:
    """The evaluation windows of a text file: `part` of it, tokenized and cut (see module doc)."""
    return token_windows(tokenizer, text_part(text_path, part), seq_len, max_windows)


def model_perplexity(
    model,
    tokenizer,
    text_path: Path | str,
    *,
    part: str = "eval",
    seq_len: int = DEFAULT_SEQ_LEN,
    max_windows: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> PerplexityResult:
    """One call: held-out perplexity of `model` on `part` of `text_path` (default: second half)."""
    windows = eval_windows(tokenizer, text_path, part, seq_len, max_windows)
    return perplexity(model, windows, batch_size)
