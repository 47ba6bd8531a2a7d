"""Block-by-block execution for calibration methods (GPTQ's "sequential" mode).

The model is built from `source.config` on the meta device with transformers' own modules, so
every architecture's attention, rotary embedding and masking are the library's, not ours. Only
the token embedding and one decoder block at a time are materialised (in float32, from
`source.get_tensor`); peak memory stays near one block, its Hessians, and the activations
(samples x seq_len x hidden, float32).

  1. capture: the model's own forward runs on each calibration sample with every decoder layer's
     `forward` replaced by a recorder that keeps the arguments the model passes it (hidden states,
     position embeddings from its rotary module, attention mask, cache position...) and hands
     the hidden states through unchanged; the last layer's recorder stops the forward. Per-layer
     arguments matter where layers differ (sliding-window vs. global attention masks).
  2. for each block: load it; run the samples through it with forward-pre-hooks on its Linear
     modules accumulating H = 2/n Σ XᵀX (float32; linears fed the very same input tensor, such as
     q/k/v and gate/up, share one Hessian); quantize each linear; put the dequantized weight back;
     run the block again so that the next block's inputs come from the quantized one; free it.

"True sequential" inside a block (the reference implementations' default): the block's linears
are quantized in groups, in the order the forward reaches them, a group being the linears fed one
input tensor (q/k/v; o; gate/up; down in a llama block). Each group's Hessians come from a pass in
which the groups before it already hold their quantized weights; that pass stops as soon as the
group's last linear is reached, so the four groups of a llama block cost about one extra forward.
`true_sequential=False` quantizes every linear of a block from one pass on the block's inputs.
Through the block engine (engine/block_engine.py), GPTQ's passes end at the *first* linear of a
group sharing one input (`group_hessians(owners=...)`: q/k/v end at q), and the outputs of the
groups already quantized, the whole attention once o is, are served from engine/memo.py instead
of recomputed by every later pass; both bit-identical to this module's `run_blockwise`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from qtool.errors import UnsupportedError
from qtool.methods.base import LayerSpec, StopForward
from qtool.model.source import CheckpointSource

Progress = Callable[[str, int, int, str], None]  # (stage, done, total, item)


@dataclass
class QuantizedLinear:
    name: str  # tensor name, "<module>.weight"
    weight: torch.Tensor  # the original weight, as the checkpoint holds it
    qw: object  # QuantizedWeight
    stats: object  # the method's per-layer stats (e.g. GPTQStats)
    shares_hessian_with: str | None  # the tensor name whose Hessian this layer reused


@dataclass
class PassThrough:
    name: str
    tensor: torch.Tensor


_Stop = StopForward  # the one early-stop exception BlockInputs.run understands


def build_skeleton(config: dict) -> torch.nn.Module:
    """The model from a config.json dict as transformers builds it for this architecture (a causal
    LM, or an image-text-to-text model: qtool/model/structure.py), every parameter on the meta
    device; computed buffers (rotary frequencies, embedding scales) filled on the CPU, since
    checkpoints do not store them."""
    from qtool.model.structure import build_meta_model, init_buffers

    model = build_meta_model(config)
    init_buffers(model)
    return model.eval()


def materialize(module: torch.nn.Module, prefix: str, source: CheckpointSource) -> None:
    """Load `module` (a decoder block, or another submodule of the runner's model) from the
    checkpoint as float32, through transformers' own loading conversion: `prefix` is its
    checkpoint prefix, the tensors it needs are those the architecture stores it as (fused MoE
    experts from their per-expert tensors). Every parameter must come from the checkpoint."""
    from qtool.model.structure import load_into

    if "_qtool_root" not in module.__dict__:  # a module BlockRunner did not place: names as they are
        _materialize_by_name(module, prefix, source)
        return
    root, memory = module.__dict__["_qtool_root"], module.__dict__["_qtool_memory"]
    structure = source.structure
    layout = module.__dict__.get("_qtool_layout")  # a decoder block: its in-memory keys, as discovered
    rel = list(layout.pieces) if layout is not None else list(module.state_dict(keep_vars=True))
    keys = [f"{memory}.{k}" if memory else k for k in rel]
    wanted = [ck for k in keys for ck in structure.pieces.get(k, [])]
    names = {t.name for t in source.tensors()}
    missing = [n for n in wanted if n not in names]
    if missing:
        raise UnsupportedError(f"{missing[0]}: transformers' {structure.family.class_name} needs this tensor, the checkpoint has no such name")
    tensors = {}
    for n in wanted:
        t = source.get_tensor(n)
        tensors[n] = t.to(torch.float32) if t.is_floating_point() else t
    load_into(root, tensors, structure.layout)
    left = [k for k, v in module.state_dict(keep_vars=True).items() if v.is_meta]
    if left:
        raise UnsupportedError(f"{prefix}.{left[0]}: not loaded from the checkpoint into transformers' module")
    _checkpoint_names(module, structure, memory)


def _materialize_by_name(module: torch.nn.Module, prefix: str, source: CheckpointSource) -> None:
    names = {t.name for t in source.tensors()}
    keys = list(module.state_dict().keys())
    missing = [f"{prefix}.{k}" for k in keys if f"{prefix}.{k}" not in names]
    if missing:
        raise UnsupportedError(f"{missing[0]}: transformers' module expects this tensor, the checkpoint has no such name")
    state = {}
    for k in keys:
        t = source.get_tensor(f"{prefix}.{k}")
        state[k] = t.to(torch.float32) if t.is_floating_point() else t
    module.load_state_dict(state, assign=True, strict=True)


def _checkpoint_names(module: torch.nn.Module, structure, memory: str) -> None:
    """The block's state_dict() in checkpoint names (relative to its checkpoint prefix), so that
    callers read the remaining tensors from the source by the names they have there."""
    from qtool.model.structure import revert

    layout = next((b for b in structure.blocks if b.memory == memory), None)
    if layout is None or module.__dict__.get("_qtool_names"):
        return
    module.__dict__["_qtool_names"] = True

    def hook(mod, state, prefix, local_metadata):
        for k in [k for k in state if k.startswith(prefix)]:
            rel = k[len(prefix):]
            pieces = layout.pieces.get(rel)
            if pieces is None or pieces == [rel]:
                continue
            t = state.pop(k)
            if len(pieces) == 1:
                state[prefix + pieces[0]] = t
            else:
                for ck, v in revert(module.__dict__["_qtool_root"], {f"{memory}.{rel}": t}).items():
                    state[prefix + ck[len(layout.checkpoint) + 1:]] = v

    module._register_state_dict_hook(hook)


def capture_layer_inputs(model: torch.nn.Module, layers: torch.nn.ModuleList, input_ids: torch.Tensor):
    """-> hidden states per sample [1, L, hidden] and, per layer, the (args, kwargs) besides them."""
    per_layer: list[tuple[tuple, dict] | None] = [None] * len(layers)
    hidden: list[torch.Tensor] = []

    def recorder(i: int):
        def forward(*args, **kwargs):
            h = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                hidden.append(h.detach())
            if per_layer[i] is None:
                per_layer[i] = (tuple(args[1:]), dict(kwargs))
            if i == len(layers) - 1:
                raise _Stop
            return h

        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        with torch.no_grad():
            for row in input_ids:
                try:
                    model.model(input_ids=row.unsqueeze(0), use_cache=False)
                except _Stop:
                    pass
    finally:
        for layer in layers:
            del layer.forward
    return hidden, per_layer


def _run_block(block: torch.nn.Module, hidden: list[torch.Tensor], call: tuple[tuple, dict], before_each=None) -> list[torch.Tensor]:
    """Outputs per sample; a hook may cut a sample's forward short (`_Stop`): its output is then None."""
    args, kwargs = call
    outs = []
    with torch.no_grad():
        for h in hidden:
            if before_each:
                before_each()
            try:
                out = block(h, *args, **kwargs)
            except _Stop:
                outs.append(None)
                continue
            outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


class HessianCollector:
    """Forward-pre-hooks accumulating, per distinct Linear input X [tokens, in]: Σ XᵀX (when
    `hessians`), and the per-channel Σ x², Σ |x|, max |x| that `qtool calibrate` saves (importance
    matrix, activation magnitudes). Linears fed the very same input tensor (q/k/v, gate/up) share
    one accumulator: `owner[name]` is the linear whose accumulator `name` uses."""

    def __init__(self, linears: dict[str, torch.nn.Linear], *, hessians: bool = True, vectors: bool = False,
                 stop_after: str | None = None) -> None:
        self.hessians, self.vectors = hessians, vectors
        self.stop_after = stop_after  # cut each sample's forward short once this linear's input is seen
        self.order: list[str] = []  # linears in the order their inputs were first seen
        self.sum: dict[str, torch.Tensor] = {}
        self.sum_x2: dict[str, torch.Tensor] = {}
        self.sum_abs: dict[str, torch.Tensor] = {}
        self.max_abs: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.owner: dict[str, str] = {}
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._final = False
        self._handles = [lin.register_forward_pre_hook(self._hook(n)) for n, lin in linears.items()]

    def new_pass(self) -> None:
        self._seen = {}  # holding the inputs alive until here keeps their addresses unique

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x.stride())
            if name not in self.owner:
                self.order.append(name)
            if key in self._seen:
                self.owner.setdefault(name, self._seen[key][0])
            else:
                self._seen[key] = (name, x)
                self.owner.setdefault(name, name)
                if self.owner[name] == name:  # not shared on an earlier pass
                    self._accumulate(name, x.reshape(-1, x.shape[-1]).to(torch.float32))
            if name == self.stop_after:
                raise _Stop

        return hook

    def _accumulate(self, name: str, X: torch.Tensor) -> None:
        # each sample's sums in float32, added up over the samples in float64 (rounded to float32 in
        # remove()): the result then hardly depends on how the samples were split into partial sums,
        # which is what lets ranks that each sum their own windows agree with one process
        if self.hessians:
            xtx = X.T @ X
            acc = self.sum.get(name)
            # add_ widens the float32 sums exactly, as .double() would, without a float64 temporary
            self.sum[name] = xtx.double() if acc is None else acc.add_(xtx)
        if self.vectors:
            a = X.abs()
            for store, v in ((self.sum_x2, (X * X).sum(0).double()), (self.sum_abs, a.sum(0).double())):
                store[name] = v if name not in store else store[name].add_(v)
            m = a.amax(0)
            self.max_abs[name] = m if name not in self.max_abs else torch.maximum(self.max_abs[name], m)
        self.tokens[name] = self.tokens.get(name, 0) + X.shape[0]

    def hessian(self, name: str) -> torch.Tensor:
        o = self.owner[name]
        return self.sum[o] * (2.0 / self.tokens[o])

    def remove(self) -> None:
        """Hooks off; the sums final: summed over every rank's windows in a run over several
        processes (engine/distributed.py), then rounded to float32. Skipped while an exception
        is propagating (the rank leaves; the others learn it from their collective)."""
        import sys

        for h in self._handles:
            h.remove()
        self._handles = []
        self._seen = {}
        if self._final or sys.exc_info()[1] is not None:
            return
        self._final = True
        from qtool.engine.distributed import reduce_collector

        reduce_collector(self)
        for d in (self.sum, self.sum_x2, self.sum_abs):
            for k, v in d.items():
                d[k] = v.float()


class BlockRunner:
    """The model skeleton, the captured inputs of block 0, and a walk over the decoder blocks that
    materialises one block at a time. The caller runs each block (`run`), may change its weights,
    and hands the next block its inputs (`advance`)."""

    def __init__(self, source: CheckpointSource, input_ids: torch.Tensor, progress: Progress = lambda *a: None) -> None:
        self.source = source
        structure = source.structure
        model = build_skeleton(source.config)
        self.layers = model.get_submodule(structure.decoder_layers)
        self.prefixes = structure.block_prefixes()
        if len(self.prefixes) != len(self.layers):
            raise UnsupportedError(f"{source.path}: {len(self.prefixes)} decoder blocks in the checkpoint, {len(self.layers)} in the config")
        by_checkpoint = {}
        for layer, b in zip(self.layers, structure.blocks):
            layer.__dict__.update(_qtool_root=model, _qtool_memory=b.memory, _qtool_layout=b)
            by_checkpoint[b.checkpoint] = layer
        plain = model.get_submodule  # blocks are asked for by their checkpoint prefix
        model.get_submodule = lambda target: by_checkpoint[target] if target in by_checkpoint else plain(target)
        embed = model.get_input_embeddings()
        embed_name = next(n for n, m in model.named_modules() if m is embed)
        embed.__dict__.update(_qtool_root=model, _qtool_memory=embed_name)
        materialize(embed, embed_name, source)
        progress("calibrate", 0, 1, "capture block 0 inputs")
        self.hidden, self.calls = capture_layer_inputs(model, self.layers, input_ids)
        embed.to("meta")
        source.release()
        self.model = model

    def blocks(self, start: int = 0) -> Iterator[tuple[int, str, torch.nn.Module]]:
        """Blocks `start`, `start` + 1, ... materialised one at a time (a resumed run skips the first)."""
        for b, prefix in enumerate(self.prefixes):
            if b < start:
                continue
            block = self.model.get_submodule(prefix)
            materialize(block, prefix, self.source)
            try:
                yield b, prefix, block
            finally:
                block.to("meta")
                self.source.release()

    def linears(self, prefix: str, block: torch.nn.Module, wanted) -> dict[str, str]:
        """{module name inside the block: tensor name} for the block's weights in `wanted`. Names
        are the checkpoint's; a linear transformers holds otherwise (fused MoE experts, a renamed
        module) gets a Tap there (qtool/engine/taps.py) that hooks and writes like an nn.Linear."""
        from qtool.engine.taps import install

        layout = block.__dict__["_qtool_layout"]
        rel = {t[len(prefix) + 1: -len(".weight")]: t for t in layout.linears if t in wanted and t.endswith(".weight")}
        other = sorted(t for t in wanted if t.startswith(prefix + ".") and t not in layout.linears)
        if other:
            raise UnsupportedError(f"{other[0]}: no linear of transformers' module computes with it; calibration methods quantize linears only")
        names = install(block, block.__dict__["_qtool_root"], layout, rel)
        for n in names:
            if not isinstance(block.get_submodule(n), torch.nn.Linear) and type(block.get_submodule(n)).__name__ != "Tap":
                raise UnsupportedError(f"{names[n]}: not an nn.Linear in transformers' module ({type(block.get_submodule(n)).__name__})")
        return names

    def run(self, b: int, block: torch.nn.Module, collector: HessianCollector | None = None) -> list[torch.Tensor]:
        """Block `b` on the current inputs -> its outputs; `collector`'s hooks see every sample."""
        try:
            return _run_block(block, self.hidden, self.calls[b], before_each=collector.new_pass if collector else None)
        finally:
            if collector is not None:
                collector.remove()

    def advance(self, outputs: list[torch.Tensor]) -> None:
        self.hidden = outputs


def group_hessians(block: torch.nn.Module, inputs, group: list[str], stop_after: str | None,
                   owners: dict[str, str] | None = None) -> "HessianCollector":
    """One pass of `inputs` through `block` collecting the Hessians of the linears in `group` (cut short
    after `stop_after`); a linear the forward never called is an UnsupportedError naming it.

    `owners` (groups_from_probe's: linear -> the linear whose input tensor it shares): only the
    group's owners are hooked, the pass is cut short after the last of them (with `stop_after`
    set), and the others take their owner's Hessian, the very same sums, without being reached
    (q/k/v: the pass ends at q's input instead of computing q and k first)."""
    hooked = group if owners is None else [m for m in group if owners.get(m, m) == m or owners[m] not in group]
    if owners is not None and stop_after is not None:
        stop_after = hooked[-1]
    collector = HessianCollector({m: block.get_submodule(m) for m in hooked}, stop_after=stop_after)
    try:
        inputs.run(block, before_each=collector.new_pass, outputs=False)
    finally:
        collector.remove()
    for m in group:
        if m not in hooked and owners[m] in collector.owner:
            collector.owner[m] = collector.owner[owners[m]]
    for m in group:
        if m not in collector.owner:
            raise UnsupportedError(f"{inputs.prefix}.{m}.weight: the model's forward never called this layer on the calibration data")
    return collector


def groups_from_probe(block: torch.nn.Module, modules: list[str], run_probe) -> tuple[list[list[str]], dict[str, str]]:
    """`modules` (linears of `block`) grouped by shared input, in the order the forward reaches
    them, and each one's group owner; `run_probe(before_each)` runs one sample through the block.
    Linears that sample never reached come last, one group, each its own owner."""
    probe = HessianCollector({m: block.get_submodule(m) for m in modules}, hessians=False)
    try:
        run_probe(probe.new_pass)
    finally:
        probe.remove()
    groups: dict[str, list[str]] = {}
    for m in probe.order:
        groups.setdefault(probe.owner[m], []).append(m)
    unseen = [m for m in modules if m not in probe.owner]
    return list(groups.values()) + ([unseen] if unseen else []), {m: probe.owner.get(m, m) for m in modules}


def input_groups(runner: "BlockRunner", b: int, block: torch.nn.Module, names: dict[str, str]) -> list[list[str]]:
    """The block's linears grouped by shared input, in the order the forward reaches them (found on
    one sample, nothing accumulated). Linears that sample never reached come last, one group."""
    run = lambda before: _run_block(block, runner.hidden[:1], runner.calls[b], before_each=before)  # noqa: E731
    return groups_from_probe(block, list(names), run)[0]


def run_blockwise(
    source: CheckpointSource,
    specs: dict[str, LayerSpec],
    method,
    input_ids: torch.Tensor,
    *,
    true_sequential: bool = True,
    progress: Progress = lambda *a: None,
) -> Iterator[QuantizedLinear | PassThrough]:
    """Yields, block by block, every tensor of every decoder block: quantized linears as
    QuantizedLinear, everything else unchanged as PassThrough. Non-block tensors are the caller's."""
    runner = BlockRunner(source, input_ids, progress)
    n = len(runner.prefixes)
    for b, prefix, block in runner.blocks():
        progress("quantize", b, n, prefix)
        names = runner.linears(prefix, block, specs)
        groups = input_groups(runner, b, block, names) if true_sequential else [list(names)]
        done: set[str] = set()
        for group in groups:
            last = group[-1] if true_sequential and len(groups) > 1 else None
            collector = HessianCollector({m: block.get_submodule(m) for m in group}, stop_after=last)
            runner.run(b, block, collector)
            for m in group:
                if m not in collector.owner:
                    raise UnsupportedError(f"{names[m]}: the model's forward never called this layer on the calibration data")
                w = source.get_tensor(names[m])  # the checkpoint dtype: scales are stored in it
                qw, stats = method.quantize_with_stats(w, specs[names[m]], collector.hessian(m))
                with torch.no_grad():
                    block.get_submodule(m).weight.copy_(qw.dequantize(torch.float32))
                owner = collector.owner[m]
                yield QuantizedLinear(names[m], w, qw, stats, None if owner == m else names[owner])
                done.add(f"{m}.weight")
            del collector
        for k in block.state_dict().keys():
            if k not in done:
                yield PassThrough(f"{prefix}.{k}", source.get_tensor(f"{prefix}.{k}"))
        runner.advance(runner.run(b, block))  # sequential: next inputs from the quantized block
    progress("quantize", n, n, "")


@dataclass
class BlockStats:
    """One block's input statistics, per Linear (tensor names); shared inputs are stored once."""

    prefix: str
    owner: dict[str, str]  # tensor name -> tensor name of the linear whose statistics it shares
    in_features: dict[str, int]
    xtx: dict[str, torch.Tensor]  # owners only: Σ XᵀX [in, in] float32 (empty without hessians)
    sum_x2: dict[str, torch.Tensor]  # owners only: Σ x² per input channel
    sum_abs: dict[str, torch.Tensor]
    max_abs: dict[str, torch.Tensor]
    tokens: dict[str, int]  # owners only


def collect_stats(
    source: CheckpointSource,
    wanted: set[str],
    input_ids: torch.Tensor,
    *,
    hessians: bool = True,
    progress: Progress = lambda *a: None,
) -> Iterator[BlockStats]:
    """The unquantized model's input statistics of every Linear in `wanted` (tensor names), block
    by block: one pass per block, whose outputs are the next block's inputs."""
    runner = BlockRunner(source, input_ids, progress)
    n = len(runner.prefixes)
    for b, prefix, block in runner.blocks():
        progress("calibrate", b, n, prefix)
        names = runner.linears(prefix, block, wanted)
        c = HessianCollector({m: block.get_submodule(m) for m in names}, hessians=hessians, vectors=True)
        runner.advance(runner.run(b, block, c))
        owner = {names[m]: names[c.owner[m]] for m in names if m in c.owner}
        never = sorted(set(names.values()) - set(owner))
        if never:
            raise UnsupportedError(f"{never[0]}: the model's forward never called this layer (an MoE expert no token reached?)")
        in_f = {names[m]: block.get_submodule(m).in_features for m in names}
        by_t = lambda d: {names[m]: v for m, v in d.items()}  # noqa: E731
        yield BlockStats(prefix, owner, in_f, by_t(c.sum), by_t(c.sum_x2), by_t(c.sum_abs), by_t(c.max_abs), by_t(c.tokens))
    progress("calibrate", n, n, "")
