"""Option definitions shared by every command, so `--out`, `--format`, `--device`... are identical."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (or file, for single-file formats).")]
Format = Annotated[str, typer.Option("--format", "-f", help="Output format (see `qtool formats`).")]
Method = Annotated[str, typer.Option("--method", "-m", help="Quantization method (see `qtool formats`).")]
Bits = Annotated[Optional[int], typer.Option("--bits", "-b", help="Weight bits: 8, 4, 3 or 2 (integer types); 6, 5 and 1 for -m hqq.")]
GroupSize = Annotated[
    str,
    typer.Option("--group-size", "-g", help="Input columns per scale: N >= 1, 'channel' (or -1) per output channel, 'tensor' (fp8)."),
]
Device = Annotated[str, typer.Option("--device", help="Where to compute: cpu, cuda, cuda:1, mps.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (no progress bars).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
Revision = Annotated[Optional[str], typer.Option("--revision", help="Hub branch, tag or commit.")]
Token = Annotated[Optional[str], typer.Option("--token", envvar="HF_TOKEN", help="Hub token (default: $HF_TOKEN).", show_default=False)]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Read *.bin/*.pt checkpoints (weights_only=True).")]
TrustRemoteCode = Annotated[
    bool, typer.Option("--trust-remote-code", help="Run the model code a checkpoint ships (config auto_map) to build its architecture.")
]
GGUFType = Annotated[
    Optional[str],
    typer.Option("--type", "-t", help="GGUF tensor type or llama.cpp mixture: Q4_K_M, Q8_0, Q6_K, F16... (with -f gguf)."),
]
Imatrix = Annotated[
    Optional[Path],
    typer.Option("--imatrix", help="llama.cpp importance matrix (llama-imatrix's .gguf or .dat) weighting the GGUF rounding, as llama-quantize --imatrix (with -f gguf)."),
]
# calibration data, shared by `calibrate` and `quantize`
Dataset = Annotated[
    Optional[str],
    typer.Option("--dataset", help="Calibration data: a .txt/.jsonl/.json/.parquet file, a recipe (wikitext2, c4, pile-10k, ultrachat) or a Hub dataset id."),
]
DatasetConfig = Annotated[Optional[str], typer.Option("--dataset-config", help="Hub dataset: config name (e.g. wikitext-2-raw-v1).")]
Split = Annotated[Optional[str], typer.Option("--split", help="Hub dataset: split to read [default: the recipe's, else train].")]
TextField = Annotated[Optional[str], typer.Option("--text-field", help="Record field holding the text or chat messages [default: auto].")]
Samples = Annotated[int, typer.Option("--samples", help="Calibration windows.")]
SeqLen = Annotated[int, typer.Option("--seq-len", help="Tokens per calibration window.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the calibration window offsets.")]
# publishing (quantize, export)
PushToHub = Annotated[
    Optional[str],
    typer.Option("--push-to-hub", help="After the output is complete, upload it to this Hub repo (ORG/NAME); its model card becomes the repo's README.", rich_help_panel="Publish"),
]
Private = Annotated[bool, typer.Option("--private", help="--push-to-hub: create the repo private.", rich_help_panel="Publish")]
PushBranch = Annotated[
    Optional[str],
    typer.Option("--push-branch", help="--push-to-hub: upload to this branch (created if missing) [default: main].", rich_help_panel="Publish"),
]
