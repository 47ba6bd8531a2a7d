"""`qtool eval`."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.table import Table

from qtool.cli import options as opt
from qtool.cli._app import ProgressDisplay, handle_errors, out, print_json
from qtool.evaluate import COMPARE_BATCH_SIZE, DEFAULT_SEQ_LEN, EvalReport, evaluate_checkpoint
from qtool.pipeline import Event

Base = Annotated[Optional[Path], typer.Option("--base", help="The original model (folder or .gguf) to compare against: adds KL divergence and top-1 agreement.")]
Dataset = Annotated[Path, typer.Option("--dataset", help="UTF-8 text file to score.", show_default=False)]
Part = Annotated[str, typer.Option("--part", help="Which part of the file: eval (second half), calib (first half) or all.")]
SeqLen = Annotated[int, typer.Option("--seq-len", min=2, help="Tokens per window (windows do not overlap).")]
Windows = Annotated[Optional[int], typer.Option("--windows", min=1, help="Score only the first N windows.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Windows per forward pass (transformers backends); each adds seq-len × vocab float32 logits per model.")]
Backend = Annotated[str, typer.Option("--backend", help="How GGUF files run: llama.cpp, torch (dequantized into transformers) or auto (llama.cpp if installed).")]


@handle_errors
def evaluate(
    model: Annotated[Path, typer.Argument(help="The model to score: checkpoint folder (plain or compressed-tensors) or .gguf file.")],
    dataset: Dataset,
    base: Base = None,
    part: Part = "eval",
    seq_len: SeqLen = DEFAULT_SEQ_LEN,
    windows: Windows = None,
    batch_size: BatchSize = COMPARE_BATCH_SIZE,
    backend: Backend = "auto",
    device: opt.Device = "cpu",
    json_out: opt.Json = False,
    quiet: opt.Quiet = False,
) -> None:
    """Perplexity of a model on held-out text and, against --base, the mean KL divergence
    KL(base || model) of the next-token distributions and the top-1 token agreement.

    The text is tokenized once, by the base's tokenizer (else the model's), without special tokens,
    and cut into non-overlapping windows of --seq-len tokens; both models score the same windows.
    By default only the second half of the file is used, the half `qtool quantize` never calibrates on.
    Both models are held in memory at once, in float32.

    Examples:

      qtool eval smol-w4g64 --base SmolLM2-135M-Instruct --dataset wikitext2-valid.txt

      qtool eval smol-Q4_K_M.gguf --base SmolLM2-135M-Instruct --dataset wiki.txt --backend torch --json

      qtool eval ./my-model --dataset notes.txt --seq-len 1024 --windows 20
    """
    with ProgressDisplay(not (json_out or quiet)) as progress, _quiet_transformers():
        report = evaluate_checkpoint(
            model, dataset, base=base, part=part, seq_len=seq_len, max_windows=windows, backend=backend,
            batch_size=batch_size, device=device, on_batch=lambda done, total: progress(Event("score", done, total)),
        )
    if json_out:
        print_json(report.to_dict())
    else:
        out.print(_table(report))


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Loading weights" bars from transformers while loading (ours show the scoring). The bars
    compressed-tensors draws with plain tqdm while loading its checkpoints have no switch."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _table(r: EvalReport) -> Table:
    t = Table(title=f"qtool eval {r.model}", show_header=False, title_justify="left")
    t.add_row("dataset", f"{r.dataset} ({r.part} part), tokenized by {r.tokenizer}")
    t.add_row("windows", f"{r.windows} × {r.seq_len} tokens, {r.tokens_scored:,} predictions scored")
    t.add_row("perplexity", f"{r.perplexity:.4f}  ({r.backend})")
    if r.base is not None:
        t.add_row("base perplexity", f"{r.base_perplexity:.4f}  ({r.base}, {r.base_backend})")
        t.add_row("ppl ratio", f"{r.ppl_ratio:.4f}")
        t.add_row("KL(base ‖ model)", f"{r.kld_mean:.6f} nats per token")
        t.add_row("top-1 agreement", f"{100 * r.top1_agreement:.2f} %")
    t.add_row("time", f"{r.seconds:.1f} s")
    return t
