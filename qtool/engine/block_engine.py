"""The block-level method engine: every calibration method that works on whole decoder blocks
(qtool/methods/base.py `BlockMethod`: GPTQ, AWQ, learned rounding...) runs through `run_block_method`.

The engine owns, and methods never repeat:
  * block order and materialisation (engine/blockwise.py `BlockRunner`: the model's own modules,
    one block in memory at a time, float32 from the checkpoint);
  * device placement: the block, its inputs and the arguments the model passes it go to `device`;
  * activation storage: the calibration samples' hidden states between blocks, in RAM or
    memory-mapped on disk when they would not fit (engine/activations.py, chosen automatically);
  * the float targets for methods with `wants_targets`: the unquantized block's outputs on the
    inputs the already-quantized blocks before it produce (computed once per block, before the
    method touches the block); with `target_stream = "model"`, the unquantized model's own hidden
    states after the block instead (a second, float stream of activations carried through the blocks);
  * the hand-over: the method's float replacements (rescaled norms...) rounded to the checkpoint
    dtype and loaded, its QuantizedWeights dequantized into the block, then one forward of that
    block gives the next block's inputs (sequential); NaN/Inf there stops the run (NumericalError
    naming the block);
  * reuse across a block's passes (engine/memo.py): outputs of the linears a method `freeze`s (and of
    submodules all of whose linears are frozen) are served to its later passes and to the forward
    that makes the next block's inputs, bit-identical to recomputing them (`QTOOL_MEMO=0`: recompute);
  * what the pipeline receives: QuantizedLinear / PassThrough items (engine/blockwise.py), a
    replaced tensor instead of the checkpoint's, and BlockNote items for the report.
  * progress: ("quantize", block, blocks, prefix) per block, ("iterate", done, total, item) per
    iteration inside a block where the method iterates;
  * the autocast (`--amp`: the method's forward_dtype) of every block forward, and with it sdpa
    attention in place of eager where equal on one sample (engine/attention.py), for the whole block.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from qtool.devices import amp_note
from qtool.engine import heap
from qtool.engine.activations import ActivationStore, choose_storage, stores_alive
from qtool.engine.attention import fast_attention
from qtool.engine.blockwise import BlockRunner, PassThrough, Progress, QuantizedLinear, groups_from_probe
from qtool.engine.memo import LinearMemo, memo_budget
from qtool.errors import NumericalError, UnsupportedError
from qtool.methods.base import BlockInputs, BlockMethod, BlockResult, LayerSpec
from qtool.model.source import CheckpointSource

PROBE_TOKENS = 16  # with --stats: the length of the one probe sample that discovers the block's structure


@dataclass
class BlockNote:
    """A remark for the run report (e.g. linears AWQ could only clip)."""

    text: str


def to_device(obj, device: torch.device):
    """Tensors inside nested tuples/lists/dicts moved to `device`; everything else unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def input_groups(block: torch.nn.Module, inputs: BlockInputs, modules: list[str]) -> tuple[list[list[str]], dict[str, str]]:
    """The linears `modules` grouped by shared input tensor, in the order the forward reaches them
    (found on sample 0, nothing accumulated), and each one's group owner (the group's first).
    Linears the sample never reached come last, as one group, each its own owner."""
    return groups_from_probe(block, modules, lambda before: inputs.run(block, samples=[0], before_each=before))


def forward_into(block: torch.nn.Module, inputs: BlockInputs, store: ActivationStore, what: str) -> None:
    """The block on every sample, outputs written into `store`; NaN/Inf stops the run."""
    for i in range(len(inputs)):
        out = inputs.run(block, samples=[i])[0]
        if not torch.isfinite(out).all():
            raise NumericalError(f"{inputs.prefix}: NaN/Inf in the {what} block's output (calibration sample {i}); "
                                 "nothing was written")
        store[i] = out.to("cpu", torch.float32)


def set_tensor(block: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    """Overwrite the block's parameter or buffer `key` (state-dict name) in place."""
    mod_name, _, attr = key.rpartition(".")
    t = getattr(block.get_submodule(mod_name) if mod_name else block, attr)
    with torch.no_grad():
        t.copy_(value.to(t.device, t.dtype))


def check_result(prefix: str, result: BlockResult, names: dict[str, str], block: torch.nn.Module) -> None:
    missing = [m for m in names if m not in result.quantized]
    if missing:
        raise UnsupportedError(f"{names[missing[0]]}: the method returned no quantized weight for this layer")
    keys = set(block.state_dict().keys())
    unknown = [k for k in result.replaced if k not in keys]
    if unknown:
        raise UnsupportedError(f"{prefix}.{unknown[0]}: the method replaced a tensor this block does not have")


def run_block_method(
    source: CheckpointSource,
    specs: dict[str, LayerSpec],
    method: BlockMethod,
    input_ids: torch.Tensor | None,
    *,
    device: str | torch.device = "cpu",
    stats=None,
    progress: Progress = lambda *a: None,
    checkpoint=None,
) -> Iterator[QuantizedLinear | PassThrough | BlockNote]:
    """Yields, block by block, every tensor of every decoder block (tensor names as the checkpoint
    has them). `specs`: tensor name -> LayerSpec. `stats` (a CalibStats, `--stats`): the method
    takes its input statistics from it and the blocks see one short probe sample only (not
    sequential); `input_ids` is then ignored. `checkpoint` (engine/checkpoint.py BlockCheckpoint):
    its first `completed` blocks are replayed from it instead of computed, and each block computed
    here is saved to it, with the next block's inputs, before its items are yielded."""
    device = torch.device(device)
    if stats is not None:
        input_ids = torch.arange(PROBE_TOKENS).unsqueeze(0) % int(source.config.get("vocab_size") or PROBE_TOKENS)
    runner = BlockRunner(source, input_ids, progress)
    where = choose_storage(len(runner.hidden), tuple(runner.hidden[0].shape), stores_alive(method))
    store = ActivationStore.from_tensors(runner.hidden, where)
    model_stream = stats is None and method.wants_targets and method.target_stream == "model"
    fstore = ActivationStore.from_tensors(runner.hidden, where) if model_stream else None  # the float model's stream
    runner.hidden = []
    n = len(runner.prefixes)
    start = checkpoint.completed if checkpoint is not None else 0
    for b in range(start):  # resumed: these blocks' results as the interrupted run computed them
        progress("quantize", b, n, f"{runner.prefixes[b]} (from checkpoint)")
        yield from checkpoint.replay(b, source.get_tensor)
    if start:
        store = ActivationStore.from_tensors(list(checkpoint.inputs()), where)
        if model_stream:
            fstore = ActivationStore.from_tensors(list(checkpoint.inputs("float")), where)
    last = max((b for b, p in enumerate(runner.prefixes) if any(t.startswith(p + ".") for t in specs)), default=-1)
    for b, prefix, block in runner.blocks(start):
        heap.trim()  # the block before is gone (its items written, its weights freed): its heap pages go back
        progress("quantize", b, n, prefix)
        if b > last:  # no block from here on is quantized (--target / --ignore): its tensors pass as stored
            yield from (PassThrough(m.name, source.get_tensor(m.name)) for m in source.tensors() if m.name.startswith(prefix + "."))
            continue
        items, store, fstore, kept = _one_block(source, specs, method, runner, b, prefix, block, store, fstore, device,
                                                stats, progress)
        if checkpoint is not None:
            checkpoint.save(b, items, store.stacked(), kept, None if fstore is None else fstore.stacked())
        yield from items
        items = kept = None  # the pipeline has written them: not kept alive (nor their checkpoint pages) over the next block
    progress("quantize", n, n, "")


def _one_block(source: CheckpointSource, specs: dict[str, LayerSpec], method: BlockMethod, runner: BlockRunner, b: int,
               prefix: str, block: torch.nn.Module, store: ActivationStore, fstore: ActivationStore | None,
               device: torch.device, stats, progress: Progress) -> tuple[list, ActivationStore, ActivationStore | None, set[str]]:
    """One decoder block through the method -> (its items in yield order, the next block's inputs,
    the float model's stream after it (None unless `fstore`, its stream before it, is given), the
    tensor names whose items carry values other than the checkpoint's)."""
    with contextlib.ExitStack() as scope:
        memo = LinearMemo(memo_budget())  # outputs of the linears the method froze, for its later passes and ours
        scope.callback(memo.close)
        return _one_block_in(source, specs, method, runner, b, prefix, block, store, fstore, device, stats, progress, memo,
                             scope)


def _one_block_in(source: CheckpointSource, specs: dict[str, LayerSpec], method: BlockMethod, runner: BlockRunner, b: int,
                  prefix: str, block: torch.nn.Module, store: ActivationStore, fstore: ActivationStore | None,
                  device: torch.device, stats, progress: Progress,
                  memo: LinearMemo, scope: contextlib.ExitStack) -> tuple[list, ActivationStore, ActivationStore | None, set[str]]:
    metas = {m.name: m for m in source.tensors()}
    names = runner.linears(prefix, block, specs)  # module inside the block -> tensor name
    block.to(device)
    call = to_device(runner.calls[b], device)
    inputs = BlockInputs(prefix, store, call, device, stats, memo, method.forward_dtype)
    if method.forward_dtype is not None and len(inputs):  # every forward of this block (memo entries included) alike
        scope.enter_context(fast_attention(block, inputs.sample(0), call))
    block_specs = {m: _with_scale_dtype(specs[t], metas[t].dtype) for m, t in names.items()}
    targets = None
    if method.wants_targets and (block_specs or fstore is not None):  # the float stream goes on either way
        targets = ActivationStore.like(store)
        stream = inputs if fstore is None else BlockInputs(prefix, fstore, call, device, autocast=method.forward_dtype)
        forward_into(block, stream, targets, "float")
        if fstore is not None:  # the float stream goes on from the targets: its inputs are done with
            fstore.release()

    def iterate(done: int, total: int, item: str) -> None:
        progress("iterate", done, total, f"{prefix} {item}".strip())

    if block_specs:
        result = method.quantize_block(block, inputs, block_specs, targets, iterate)
    else:  # no linear of this block is quantized (--target / --ignore): it only carries the streams on
        result = BlockResult({})
    check_result(prefix, result, names, block)
    replaced = {k: t.to("cpu", metas[f"{prefix}.{k}"].dtype) for k, t in result.replaced.items()}
    for k, t in replaced.items():
        set_tensor(block, k, t)
    for m, qw in result.quantized.items():
        set_tensor(block, f"{m}.weight", qw.dequantize(torch.float32))
    notes = list(result.notes)
    if method.forward_dtype is not None and (note := amp_note(method.registry_name, device.type)):
        notes.append(note)  # said per block (counted once in the report), so a --resume'd run reports the same
    items: list = [BlockNote(text) for text in notes]
    done, kept = set(), set()
    for m, qw in result.quantized.items():
        key = f"{m}.weight"
        w = replaced.get(key)
        owner = result.shares.get(m)
        if w is not None:
            kept.add(names[m])
        items.append(QuantizedLinear(names[m], source.get_tensor(names[m]) if w is None else w, _on_cpu(qw),
                                     result.stats.get(m, {}), None if owner in (None, m) else names[owner]))
        done.add(key)
    for k in block.state_dict().keys():
        if k not in done:
            if k in replaced:
                kept.add(f"{prefix}.{k}")
            items.append(PassThrough(f"{prefix}.{k}", replaced[k] if k in replaced else source.get_tensor(f"{prefix}.{k}")))
    next_float = targets if fstore is not None else None  # the float model's stream after this block
    del targets  # freed before the next inputs are computed, unless the float stream goes on with them
    nxt = ActivationStore.like(store)  # sequential: the next block's inputs come from this quantized block
    forward_into(block, inputs, nxt, "quantized")
    return items, nxt, next_float, kept


def _on_cpu(qw):
    """The pipeline measures and writes on the CPU, whatever --device computed on."""
    if qw.codes.device.type == "cpu":
        return qw
    if hasattr(qw, "cpu"):  # not an integer-grid weight (core/codebook.py): it knows its own parts
        return qw.cpu()
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    return replace(qw, codes=cpu(qw.codes), scale=cpu(qw.scale), zero_point=cpu(qw.zero_point), g_idx=cpu(qw.g_idx),
                   kblock=None if qw.kblock is None else qw.kblock.to("cpu"))


def _with_scale_dtype(spec: LayerSpec, dtype: torch.dtype) -> LayerSpec:
    """Methods see the block in float32; scales are stored in the checkpoint dtype unless the format said otherwise."""
    return spec if spec.scale_dtype is not None else replace(spec, scale_dtype=dtype)


BlockItems = Callable[..., Iterator[QuantizedLinear | PassThrough | BlockNote]]
