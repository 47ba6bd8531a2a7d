"""The pipeline's side of a run over several processes (engine/distributed.py has the Comm).

  * `agree_on_run`: before any work, every rank's record of the run (input files, recipe, format,
    per-layer specs, calibration windows' token hash, versions) is all-gathered and must match
    rank 0's; calibration runs also need at least one window per rank (the maximum is said).
  * `shard_ids`: this rank's contiguous run of calibration windows.
  * `DistCheckpoint`: the resume checkpoint (engine/checkpoint.py) as the block engine sees it on
    every rank; rank 0 alone owns the folder. Each block's next inputs are gathered to rank 0 in
    window order and saved as one file, exactly what a single process saves, so a checkpoint is
    resumable with any number of processes.
  * `dist_stream`: the calibration-free path: the tensors that need quantizing are dealt to the
    ranks in file order (tensor j to rank j mod N), each rank quantizes its share (a method's
    QuantizedWeight, or a GGUF writer's encoded blocks) and the results are gathered, a round
    of N at a time, to rank 0, which writes everything in the usual order: the bytes equal a
    single process's.
  * `follow`: what ranks other than 0 run: the same engine, nothing written.
"""

from __future__ import annotations

from typing import Callable

import torch

from qtool.engine.distributed import Comm
from qtool.errors import UsageError


# -- agreement ---------------------------------------------------------------------------------------
def run_record(source, recipe, writer, plan, calibration: dict | None, input_ids, inputs: dict | None) -> dict:
    """What every rank must agree on (engine/checkpoint.py's fingerprint: input files, recipe,
    format, specs, calibration windows, versions). `inputs` without hashes (not a calibration run)
    compares the files' names and sizes and the config."""
    import hashlib
    import json

    from qtool.engine.checkpoint import fingerprint
    from qtool.pipeline import input_record

    if inputs is None:
        inputs = input_record(source, hash_inputs=False)
        inputs["config"] = hashlib.sha256(json.dumps(source.config, sort_keys=True, default=str).encode()).hexdigest()
    return fingerprint(inputs=inputs, recipe=recipe.to_dict() if recipe else None, fmt=writer.registry_name,
                       specs={n: repr(s) for n, s in plan.specs.items()}, calibration=calibration or {}, input_ids=input_ids)


def calibrate_record(source, recipe, wanted: set[str], hessians: bool, calibration: dict, input_ids, imatrix_out) -> dict:
    """`qtool calibrate`'s record for the agreement: as run_record, with the layers and what is saved."""
    from qtool.engine.checkpoint import fingerprint
    from qtool.pipeline import input_record

    rec = fingerprint(inputs=input_record(source, hash_inputs=False), recipe=recipe.to_dict(), fmt="stats",
                      specs={n: "" for n in sorted(wanted)}, calibration=calibration or {}, input_ids=input_ids)
    rec["saved"] = {"hessians": hessians, "imatrix": imatrix_out is not None}
    return rec


def check_windows(comm: Comm, windows: int) -> None:
    if windows < comm.world:
        raise UsageError(f"--nproc {comm.world}: only {windows} calibration window(s) to share; at most --nproc {windows} "
                         "(or more --samples)")


def shard_ids(comm: Comm, input_ids: torch.Tensor | None) -> torch.Tensor | None:
    if input_ids is None or not comm.active:
        return input_ids
    r = comm.shard(input_ids.shape[0])
    return input_ids[r.start:r.stop]


# -- the resume checkpoint -------------------------------------------------------------------------------
class DistCheckpoint:
    """engine/checkpoint.py's BlockCheckpoint seen from every rank: rank 0 holds the real one
    (`inner`); the others only read the blocks and inputs it saved."""

    def __init__(self, comm: Comm, make: Callable[[], object], folder, windows: int) -> None:
        self.comm, self.windows, self.folder = comm, windows, folder
        self.inner = make() if comm.is_writer else None  # rank 0 creates (or opens, refusing a mismatch) the folder
        state = comm.broadcast_object(self.inner.completed if self.inner is not None else None, what="the checkpoint opening")
        self.completed = state
        if self.inner is None:
            from qtool.engine.checkpoint import BlockCheckpoint

            self._reader = BlockCheckpoint.__new__(BlockCheckpoint)  # read-only: no folder created or removed
            self._reader.folder, self._reader.fp, self._reader.completed = folder, None, state

    @property
    def _ck(self):
        return self.inner if self.inner is not None else self._reader

    @property
    def saved(self) -> int:
        return self._ck.saved

    def inputs(self, stream: str = "hidden") -> torch.Tensor:
        r = self.comm.shard(self.windows)
        full = self._ck.inputs(stream)
        if full.shape[0] != self.windows:
            from qtool.errors import FormatError

            raise FormatError(f"{self.folder}: the checkpoint holds {full.shape[0]} windows' inputs, this run has {self.windows}; "
                              "run without --resume")
        return full[r.start:r.stop].clone()

    def replay(self, b: int, read):
        return self._ck.replay(b, read)

    def save(self, b: int, items, next_inputs: torch.Tensor, replaced, next_float: torch.Tensor | None = None) -> None:
        parts = self.comm.gather_object(next_inputs.detach().to("cpu").contiguous(), what="the checkpoint's inputs gather")
        floats = None
        if next_float is not None:  # the float model's stream (a method tuned toward it), gathered the same way
            floats = self.comm.gather_object(next_float.detach().to("cpu").contiguous(), what="the checkpoint's float stream gather")
        if self.inner is not None:
            self.inner.save(b, items, torch.cat(parts), replaced, None if floats is None else torch.cat(floats))
        self.comm.barrier(what="the checkpoint save")

    def discard(self) -> None:
        if self.inner is not None:
            self.inner.discard()


# -- calibration-free: tensors dealt to the ranks --------------------------------------------------------
def _work(metas, writer, plan) -> list[str]:
    """The tensors whose quantization is dealt out, in file order."""
    if writer.self_quantizing and not plan.specs:
        return [m.name for m in metas if writer.takes(m.name)]
    return [m.name for m in metas if m.name in plan.specs]


def _quantize_one(source, name: str, writer, plan, method, stats, device):
    """This rank's share of one tensor: (QuantizedWeight, per-layer stats) or a GGUF writer's encoding."""
    from qtool.pipeline import _layer_stats, module_of

    t = source.get_tensor(name)
    spec = plan.specs.get(name)
    if spec is None:  # a self-quantizing writer encodes it
        return ("encoded", writer.encode_tensor(name, t))
    w = t.to(device)
    if stats is not None:
        qw, st = method.quantize_with_stats(w, spec, stats.hessian(module_of(name)).to(device))
        layer = _layer_stats(st, stats.modules[module_of(name)].owner + ".weight", name)
    else:
        qw, layer = method.quantize(w, spec), None
    from qtool.engine.block_engine import _on_cpu

    return ("qw", _on_cpu(qw), layer)


class _Dealer:
    """Rounds of N work items: rank r quantizes item k·N + r of round k; rank 0 gathers each round."""

    def __init__(self, comm: Comm, work: list[str], do: Callable[[str], object]) -> None:
        self.comm, self.work, self.do = comm, work, do
        self.rounds = -(-len(work) // comm.world)
        self.round = 0
        self.ready: dict[str, object] = {}

    def next_round(self) -> None:
        k, n = self.round, self.comm.world
        j = k * n + self.comm.rank
        mine = (self.work[j], self.do(self.work[j])) if j < len(self.work) else None
        got = self.comm.gather_object(mine, what=f"the exchange of quantized tensors (round {k + 1}/{self.rounds})")
        if got is not None:
            self.ready.update(dict(g for g in got if g is not None))
        self.round += 1

    def take(self, name: str):
        while name not in self.ready:
            self.next_round()
        return self.ready.pop(name)

    def finish(self) -> None:
        while self.round < self.rounds:
            self.next_round()


def dist_stream(comm: Comm, source, writer, plan, report, on_event, method, stats=None) -> None:
    """pipeline._stream over several processes (see the module docstring). Rank 0 writes; the
    others quantize their share and return."""
    from qtool.pipeline import Event, LayerResult, _add_tensor, _write_quantized, check_finite, ordered_tensors

    metas = ordered_tensors(source)
    device = torch.device(report.recipe["device"]) if report.recipe else torch.device("cpu")
    dealer = _Dealer(comm, _work(metas, writer, plan), lambda n: _quantize_one(source, n, writer, plan, method, stats, device))
    if not comm.is_writer:
        for k in range(dealer.rounds):
            on_event(Event("quantize", k, dealer.rounds, ""))
            dealer.next_round()
        return
    dealt = set(dealer.work)
    current_block = None
    for i, m in enumerate(metas):
        on_event(Event("quantize" if plan.specs or dealt else "convert", i, len(metas), m.name))
        if source.block_of(m.name) != current_block:
            source.release()
            current_block = source.block_of(m.name)
        t = source.get_tensor(m.name)
        report.params_total += m.numel
        if m.name not in dealt:
            if writer.self_quantizing:
                check_finite(m.name, t, str(source.path))
            _add_tensor(m.name, t, report, writer)
            continue
        got = dealer.take(m.name)
        if got[0] == "encoded":
            check_finite(m.name, t, str(source.path))
            outcome = writer.put_encoded(m.name, got[1])
            if outcome is not None:  # as pipeline._add_tensor reports a self-quantizing writer's tensor
                report.layers.append(LayerResult(m.name, tuple(t.shape), outcome.qtype, None, outcome.sqnr_db, outcome.note))
                report.params_quantized += t.numel()
                report.weight_bits += outcome.storage_bits
            continue
        _, qw, layer = got
        _write_quantized(m.name, t.to(device), qw, plan.specs[m.name], plan, report, writer, str(source.path), layer)
        del t, qw
    dealer.finish()
    on_event(Event("quantize" if plan.specs else "convert", len(metas), len(metas)))


# -- ranks other than 0 --------------------------------------------------------------------------------
def follow(comm: Comm, source, writer, recipe, plan, report, on_event, method, input_ids, stats, checkpoint,
           blockwise: bool) -> None:
    """A rank other than 0: the same computation as rank 0, nothing written."""
    if blockwise:
        from qtool.engine.block_engine import run_block_method
        from qtool.pipeline import Event, check_block_linears_only

        check_block_linears_only(plan, report.recipe["method"], source)
        progress = lambda stage, done, total, item: on_event(Event(stage, done, total, item))  # noqa: E731
        for _ in run_block_method(source, plan.specs, method, input_ids, device=report.recipe.get("device", "cpu"),
                                  stats=stats, progress=progress, checkpoint=checkpoint):
            pass
        return
    if writer.self_quantizing and not plan.specs:
        writer.prepare(source, recipe)
    dist_stream(comm, source, writer, plan, report, on_event, method, stats)

