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

`evaluate_checkpoint` (the `qtool eval` command) applies the same protocol to a checkpoint on disk in
any format qtool writes (checkpoint folder, compressed-tensors folder, GGUF file through llama.cpp or
dequantized into transformers), and against a base model adds the mean KL divergence of next-token
distributions and the top-1 agreement; see the notes above `BACKENDS`.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from qtool.devices import check_device
from qtool.errors import FormatError, UnsupportedError, UsageError

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
    return logits_nll(model(input_ids=batch, use_cache=False).logits, batch)


def logits_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """`window_nll` from logits already computed: [b, seq_len, vocab] for the windows `batch`."""
    logits = logits[:, :-1].float()
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


# ------------------------------------------------------------------------------------------------
# `qtool eval`: a checkpoint in any format qtool writes, scored on the same windows as its base.
#
# * Tokens: the windows are tokenized ONCE, by the Hugging Face tokenizer of --base (or, without
#   a base or when the base folder has none, of the model itself; a GGUF's through transformers'
#   GGUF reader), with no special tokens, exactly as `token_windows` does. The same token ids go
#   to every model and every backend, so BOS handling is the same on both sides: there is none
#   (llama.cpp's `Llama.eval` adds nothing to what it is given).
# * Memory: both models are loaded at once (fine for the small models this is meant for; a 7B
#   pair needs twice its weights in float32). Windows are scored in batches, and only one batch
#   of logits per model is alive at a time: each batch is reduced to sums (NLL, KL, agreement)
#   window by window before the next is computed.
# * KL(base || model) and top-1 agreement are taken at the same positions as the NLL: the
#   predictions of tokens 2..seq_len of every window, so all three share `tokens_scored`.

BACKENDS = ("auto", "llama.cpp", "torch")  # how a GGUF is run; HF folders always run in transformers
# One window per forward pass: a window's logits are seq_len x vocab float32 (100 MB for 512 x 49152),
# and the NLL and KL steps each make a copy or two; a larger batch costs memory, not much time on CPU.
COMPARE_BATCH_SIZE = 1


@dataclass(frozen=True)
class EvalReport:
    model: str
    base: str | None
    dataset: str
    part: str
    tokenizer: str  # the checkpoint whose tokenizer cut the windows
    windows: int
    seq_len: int
    tokens_scored: int
    perplexity: float
    base_perplexity: float | None
    ppl_ratio: float | None
    kld_mean: float | None  # nats per scored position, KL(base || model)
    top1_agreement: float | None  # fraction of scored positions where both argmaxes agree
    seconds: float  # wall time, loading included
    backend: str  # how the model ran: transformers, torch (GGUF dequantized) or llama.cpp
    base_backend: str | None

    def to_dict(self) -> dict:
        return asdict(self)


class TorchScorer:
    """A transformers causal LM: logits [b, s, vocab] float32 for a batch of token windows."""

    def __init__(self, model, backend: str = "transformers", device: str = "cpu"):
        self.model = model.to(device).eval()
        self.backend = backend
        self.device = torch.device(device)
        self.vocab_size = int(model.config.get_text_config().vocab_size)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(input_ids=batch.to(self.device), use_cache=False).logits.float()

    def close(self) -> None:
        self.model = None


class LlamaCppScorer:
    """A GGUF file run by llama.cpp (the `llama_cpp` binding): one window at a time, a fresh KV
    cache each, `logits_all=True` so that every position's logits come back."""

    backend = "llama.cpp"

    def __init__(self, path: Path, seq_len: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=seq_len, n_batch=min(seq_len, 512), logits_all=True,
                         n_threads=max(1, len(os.sched_getaffinity(0))), verbose=False)
        self.vocab_size = int(self.llm.n_vocab())
        self.device = torch.device("cpu")

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        rows = []
        for window in batch.tolist():
            self.llm.reset()  # n_tokens = 0: eval() then clears the whole KV cache
            self.llm.eval(window)
            rows.append(torch.from_numpy(self.llm.scores[: len(window)].copy()))
        return torch.stack(rows)

    def close(self) -> None:
        self.llm.close()


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def resolve_backend(backend: str) -> str:
    """`auto` -> llama.cpp when the `llama_cpp` binding imports, else torch."""
    if backend not in BACKENDS:
        raise UsageError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return backend
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        if backend == "llama.cpp":
            raise UnsupportedError(f"--backend llama.cpp: the llama_cpp binding does not import ({e}); "
                                   "install llama-cpp-python or use --backend torch") from None
        return "torch"
    return "llama.cpp"


def _check_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise FormatError(f"{what} {path}: no such file or folder")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FormatError(f"{what} {path}: a folder without config.json (expected a Hugging Face checkpoint)")
    if path.is_file() and not is_gguf(path):
        raise FormatError(f"{what} {path}: not a GGUF file (expected a .gguf file or a checkpoint folder)")


def load_hf_model(folder: Path):
    """A checkpoint folder (plain safetensors or compressed-tensors) in float32. transformers 5.23
    cannot load asymmetric compressed-tensors zero points through its default route, and GPTQ needs
    optimum + gptqmodel: int4 ones of both run from their packed weights (qtool.kernels'
    `Int4Linear`), others are dequantized (CompressedTensorsConfig(dequantize=True), qtool's reader)."""
    import json

    from transformers import AutoModelForCausalLM

    from qtool.kernels.packed_model import load_packed_int4, packable
    if packable(folder):  # W4 folders that would be dequantized densely run from their packed weights
        return load_packed_int4(folder, packable(folder))

    config = json.loads((folder / "config.json").read_text())
    from qtool.model.onthefly_source import onthefly_kind

    kind = onthefly_kind(folder)
    if kind is not None:  # hqq / optimum-quanto / Quark: their own loaders (stock transformers misreads them)
        return load_onthefly(folder, config, kind)
    if not _has_runtime((config.get("quantization_config") or {}).get("quant_method")):
        return load_gptq_dequantized(folder, config)
    if _otf_without_runtime(config):
        from qtool.formats.hf_quantized import read_dequantized

        return model_from_state(config, read_dequantized(folder), folder)
    kw = {}
    if _asymmetric_compressed_tensors(config.get("quantization_config") or {}):
        from transformers import CompressedTensorsConfig

        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    try:
        with warnings.catch_warnings():  # "...already has a quantization_config...": yes, on purpose
            warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(f"{folder}: transformers cannot load it: {_one_line(e)}") from e


# The packages transformers needs to run each int32-packed layout; without them qtool's reader
# dequantizes (auto-round's AWQ packing also needs gptqmodel: required for all auto-round here).
RUNTIMES = {"gptq": ("optimum", "gptqmodel"), "awq": ("gptqmodel",), "auto-round": ("auto_round", "gptqmodel"),
            "intel/auto-round": ("auto_round", "gptqmodel")}


def _has_runtime(quant_method: str | None) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in RUNTIMES.get(str(quant_method), ()))


# transformers' quantizer layouts qtool writes: the package transformers needs to load each on a CPU
# (None: no CPU runtime at all); without it `qtool eval` scores qtool's own dequantization, the math
# tests/test_otf_formats.py holds equal to the runtime's weights.
OTF_RUNTIMES = {"bitsandbytes": "bitsandbytes", "torchao": "torchao", "fp8": "accelerate", "fbgemm_fp8": None, "eetq": None,
                "aqlm": "aqlm"}


def _otf_without_runtime(config: dict) -> bool:
    import importlib.util

    method = (config.get("quantization_config") or {}).get("quant_method")
    if method not in OTF_RUNTIMES:
        return False
    need = OTF_RUNTIMES[method]
    return need is None or importlib.util.find_spec(need) is None


def _asymmetric_compressed_tensors(qconfig: dict) -> bool:
    if qconfig.get("quant_method") != "compressed-tensors":
        return False
    groups = (qconfig.get("config_groups") or {}).values()
    return any((g.get("weights") or {}).get("symmetric") is False for g in groups)


def load_gguf_torch(path: Path):
    """A GGUF dequantized (qtool's GGUFSource) into a transformers model built from its config,
    in float32, in memory: nothing is written."""
    from qtool.model.gguf_source import GGUFSource

    source = GGUFSource(path, dtype=torch.float32)
    try:
        config = dict(source.config)
        state = {m.name: source.get_tensor(m.name) for m in source.tensors()}
    finally:
        source.close()
    return model_from_state(config, state, path)


def model_from_state(config: dict, state: dict[str, torch.Tensor], where: Path):
    """A float32 transformers model built from a config.json dict and filled from `state`."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    with no_init_weights():  # every weight is overwritten below; buffers are still built
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise FormatError(f"{where}: tensors the model has no place for: {', '.join(result.unexpected_keys[:4])}")
    model.tie_weights()  # the missing keys are tied aliases (lm_head of tied models): the readers check the rest
    return model.eval()


def load_onthefly(folder: Path, config: dict, kind: str):
    """An hqq / optimum-quanto / Quark folder through its runtime where it is installed (hqq's
    AutoHQQHFModel, quanto's QuantizedModelForCausalLM, transformers + amd-quark), else
    dequantized by qtool's reader: the math tests/test_hqq.py, test_quanto_format.py and
    test_quark_format.py match against those runtimes."""
    import importlib.util

    runtime = {"hqq": "hqq", "quanto": "optimum.quanto", "quark": "quark"}[kind]
    try:
        available = importlib.util.find_spec(runtime) is not None
    except ModuleNotFoundError:
        available = False
    if available:
        if kind == "hqq":
            from hqq.models.hf.base import AutoHQQHFModel

            return AutoHQQHFModel.from_quantized(str(folder), compute_dtype=torch.float32, device="cpu").eval()
        if kind == "quanto":
            from optimum.quanto import QuantizedModelForCausalLM

            return QuantizedModelForCausalLM.from_pretrained(str(folder))._wrapped.eval()
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    from qtool.model.onthefly_source import dequantized_state

    state = {k: (v.float() if v.is_floating_point() else v) for k, v in dequantized_state(folder, kind).items()}
    return model_from_state(config, state, folder)


def load_gptq_dequantized(folder: Path, config: dict):
    """A GPTQ / AWQ / auto-round folder without its runtime (gptqmodel, auto-round): dequantized by
    qtool's reader, the very math the loader tests (tests/test_gptq_format.py, test_awq_format.py,
    test_autoround_format.py) match against those runtimes."""
    from qtool.model.quantized_source import read_dequantized

    state = {k: (v.float() if v.is_floating_point() else v) for k, v in read_dequantized(folder).items()}
    return model_from_state(config, state, folder)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        if path.is_file():
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{path}: no usable tokenizer: {_one_line(e)}") from e


def open_scorer(path: Path, backend: str, seq_len: int, device: str = "cpu"):
    """Load `path` (checkpoint folder or GGUF file) for scoring; `backend` as resolve_backend gives."""
    if path.is_dir():
        return TorchScorer(load_hf_model(path), "transformers", device)
    if backend == "llama.cpp":
        return LlamaCppScorer(path, seq_len)
    return TorchScorer(load_gguf_torch(path), "torch", device)


@dataclass
class _Sums:
    nll: float = 0.0
    base_nll: float = 0.0
    kld: float = 0.0
    agree: int = 0


def _compare_window(logits: torch.Tensor, base_logits: torch.Tensor, sums: _Sums) -> None:
    """Add one window's KL(base || model) and top-1 agreements ([seq_len, vocab] logits each)."""
    log_q = torch.log_softmax(logits[:-1].float(), dim=-1)
    log_p = torch.log_softmax(base_logits[:-1].float().to(log_q.device), dim=-1)
    sums.kld += float((log_p.exp() * (log_p - log_q)).sum(dtype=torch.float64))
    sums.agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())


def compare(
    scorer,
    windows: torch.Tensor,
    base_scorer=None,
    batch_size: int = COMPARE_BATCH_SIZE,
    on_batch: Callable[[int, int], None] = lambda done, total: None,
) -> dict:
    """Score `windows` [n, seq_len] with `scorer` (and `base_scorer`, on the same windows).
    Returns perplexity, and with a base: base_perplexity, ppl_ratio, kld_mean, top1_agreement."""
    n, seq_len = windows.shape
    sums = _Sums()
    for start in range(0, n, batch_size):
        batch = windows[start : start + batch_size]
        logits = scorer.logits(batch)
        sums.nll += float(logits_nll(logits, batch.to(logits.device)).sum())
        if base_scorer is not None:
            base_logits = base_scorer.logits(batch)
            sums.base_nll += float(logits_nll(base_logits, batch.to(base_logits.device)).sum())
            for i in range(batch.shape[0]):
                _compare_window(logits[i], base_logits[i], sums)
            del base_logits
        del logits
        on_batch(min(start + batch_size, n), n)
    scored = n * (seq_len - 1)
    result = {"tokens_scored": scored, "perplexity": math.exp(sums.nll / scored), "base_perplexity": None,
              "ppl_ratio": None, "kld_mean": None, "top1_agreement": None}
    if base_scorer is not None:
        base_ppl = math.exp(sums.base_nll / scored)
        result.update(base_perplexity=base_ppl, ppl_ratio=result["perplexity"] / base_ppl,
                      kld_mean=sums.kld / scored, top1_agreement=sums.agree / scored)
    return result


def evaluate_checkpoint(
    model: Path | str,
    dataset: Path | str,
    *,
    base: Path | str | None = None,
    part: str = "eval",
    seq_len: int = DEFAULT_SEQ_LEN,
    max_windows: int | None = None,
    backend: str = "auto",
    batch_size: int = COMPARE_BATCH_SIZE,
    device: str = "cpu",
    on_batch: Callable[[int, int], None] = lambda done, total: None,
) -> EvalReport:
    """`qtool eval`: perplexity of `model` on `part` of `dataset`, and against `base` the KL
    divergence and top-1 agreement of next-token distributions (see the notes above)."""
    t0 = time.perf_counter()
    model, dataset = Path(model), Path(dataset)
    base = Path(base) if base is not None else None
    device = check_device(device)  # exit 2 before anything is loaded
    _check_args(model, dataset, base, part, seq_len, max_windows, batch_size)
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if any(p is not None and p.is_file() for p in (model, base)):  # only GGUF files have a choice
        backend = resolve_backend(backend)
    tok_path, tokenizer = _tokenizer_for(model, base)
    windows = _windows(tokenizer, tok_path, dataset, part, seq_len, max_windows)
    scorers = [open_scorer(model, backend, seq_len, device)]
    try:
        if base is not None:
            scorers.append(open_scorer(base, backend, seq_len, device))
            _check_vocab(scorers[0].vocab_size, model, scorers[1].vocab_size, base)
        limit = min(s.vocab_size for s in scorers)
        if int(windows.max()) >= limit:
            raise UsageError(f"tokenizer of {tok_path} gives token id {int(windows.max())}, "
                             f"beyond the vocabulary ({limit}) of the model")
        stats = compare(scorers[0], windows, scorers[1] if base is not None else None, batch_size, on_batch)
    finally:
        for s in scorers:
            s.close()
    return EvalReport(
        model=str(model), base=None if base is None else str(base), dataset=str(dataset), part=part,
        tokenizer=str(tok_path), windows=windows.shape[0], seq_len=seq_len, **stats,
        seconds=time.perf_counter() - t0, backend=scorers[0].backend,
        base_backend=scorers[1].backend if base is not None else None,
    )


def _check_args(model, dataset, base, part, seq_len, max_windows, batch_size) -> None:
    if part not in PARTS:
        raise UsageError(f"--part {part!r}: expected one of {', '.join(PARTS)}")
    if seq_len < 2:
        raise UsageError(f"--seq-len {seq_len}: need at least 2 tokens per window")
    if max_windows is not None and max_windows < 1:
        raise UsageError(f"--windows {max_windows}: need at least 1")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: need at least 1")
    _check_exists(model, "model")
    if base is not None:
        _check_exists(base, "base")
    if not dataset.is_file():
        raise FormatError(f"dataset {dataset}: no such file")


def _tokenizer_for(model: Path, base: Path | None):
    """The base's tokenizer, else the model's (a folder may hold none: then the other one's)."""
    candidates = [p for p in (base, model) if p is not None]
    for p in candidates:
        if p.is_file() or (p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file():
            return p, load_tokenizer(p)
    raise FormatError(f"no tokenizer in {' nor '.join(map(str, candidates))}")


def _windows(tokenizer, tok_path: Path, dataset: Path, part: str, seq_len: int, max_windows: int | None) -> torch.Tensor:
    try:
        text = text_part(dataset, part)
    except UnicodeDecodeError as e:
        raise FormatError(f"dataset {dataset}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return token_windows(tokenizer, text, seq_len, max_windows)
    except ValueError as e:  # only "not enough tokens" can come from here
        raise UsageError(f"dataset {dataset} ({part} part) is too short: {e} "
                         f"(tokenized by {tok_path}); use a longer file or a smaller --seq-len") from None


def _check_vocab(n_model: int, model: Path, n_base: int, base: Path) -> None:
    if n_model != n_base:
        raise UsageError(f"vocabulary sizes differ: {model} has {n_model}, base {base} has {n_base}; "
                         "KL divergence needs the same vocabulary")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
