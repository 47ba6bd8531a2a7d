"""The communication layer of a run over several processes (torch.distributed).

One `Comm` per process. World size 1 (no launcher, or `--nproc 1`) is the plain single-process
run: every collective is the identity and nothing is imported from torch.distributed. Under
`torchrun` (or `qtool quantize --nproc N`, which starts torchrun: cli/launch.py) the rank, world
size and rendezvous come from torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); the backend is gloo for a CPU run and nccl for a CUDA one (`--device`).

What is communicated, and where:
  * data-parallel calibration (engine/blockwise.py HessianCollector): the calibration windows are
    sharded across ranks in contiguous runs (`shard`); each rank sums its windows' statistics in
    window order in float64, and `reduce_collector` sums those partials across ranks (float64),
    so every rank holds the same statistics before the method quantizes;
  * calibration-free paths (engine/dist_pipeline.py): tensors split across ranks, results
    gathered to rank 0, which alone writes;
  * small agreements (fingerprints, owner maps): pickled objects.

Errors: a collective that fails because another rank is gone (killed, or failed and exited)
raises `RankLost` naming this rank; library code never prints or exits. `bytes_reduced` counts
the payload bytes this rank contributed to all-reduces (the bench reads it per block).
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from typing import Iterator

import torch

from qtool.errors import QtoolError, UsageError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 1800  # a collective waiting this long for a silent peer gives up (QTOOL_DIST_TIMEOUT)


class RankLost(QtoolError):
    """A collective failed: another rank of the run failed or was killed."""

    exit_code = 6


class Comm:
    """This process's place in the run; world size 1 is a no-op."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, backend: str | None = None,
                 device: torch.device | None = None) -> None:
        self.rank, self.world, self.local_rank, self.backend = rank, world, local_rank, backend
        self.device = device or torch.device("cpu")  # where collective buffers live (nccl: this rank's GPU)
        self.bytes_reduced = 0  # payload bytes this rank put into all-reduces
        self.collectives = 0
        self.solved = [0, 0]  # weight rows this rank solved, of all in the solves it took part in (GPTQ splits them)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes outputs and reports."""
        return self.rank == 0

    def shard(self, n: int, rank: int | None = None) -> range:
        """This rank's contiguous run of `n` items (windows): ranks hold n // world or one more,
        lower ranks first, in item order."""
        r = self.rank if rank is None else rank
        return range(r * n // self.world, (r + 1) * n // self.world)

    def assign(self, costs: list[float]) -> list[int]:
        """A rank per item, balancing the summed cost (largest first, each to the least-loaded rank,
        ties to the lower rank): the same answer on every rank, since every rank brings the same costs."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[i], load[r] = r, load[r] + costs[i]
        return owner

    # -- collectives -------------------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        import torch.distributed as dist

        self.collectives += 1
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ConnectionError, dist.DistError) as e:  # gloo/nccl: peer closed, reset, timed out
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RankLost(f"rank {self.rank}: lost the other ranks during {what} (another rank failed or was killed): "
                           f"{first[:160]}") from None

    def all_reduce(self, t: torch.Tensor, op: str = "sum", what: str = "an all-reduce") -> torch.Tensor:
        """`t` reduced in place over the ranks (sum or max); returns it."""
        if not self.active:
            return t
        import torch.distributed as dist

        buf = t if t.device == self.device else t.to(self.device)
        self.bytes_reduced += buf.numel() * buf.element_size()
        self._call(what, dist.all_reduce, buf, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        if buf is not t:
            t.copy_(buf)
        return t

    def all_gather_object(self, obj, what: str = "an exchange") -> list:
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world
        self._call(what, dist.all_gather_object, out, obj)
        return out

    def gather_object(self, obj, what: str = "a gather") -> list | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list | None = [None] * self.world if self.rank == 0 else None
        self._call(what, dist.gather_object, obj, out, dst=0)
        return out

    def broadcast_object(self, obj, what: str = "a broadcast"):
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        self._call(what, dist.broadcast_object_list, box, src=0)
        return box[0]

    def barrier(self, what: str = "a barrier") -> None:
        if self.active:
            self.all_reduce(torch.zeros(1, device=self.device), what=what)  # a barrier that fails like the others

    def agree(self, record: dict, what: str) -> None:
        """Every rank must bring the same `record` (inputs, recipe, calibration windows...):
        refused (UsageError) before any work, naming the first rank and key that differ."""
        if not self.active:
            return
        from qtool.engine.checkpoint import _describe, _first_difference, _lookup

        records = self.all_gather_object(record, what=f"the {what} check")
        for r, other in enumerate(records):
            diff = _first_difference(records[0], other)
            if diff is not None:
                raise UsageError(f"ranks disagree on the {what}: rank {r} differs from rank 0 in "
                                 f"{_describe(diff, _lookup(other, diff), _lookup(records[0], diff)).replace('in the checkpoint', f'on rank {r}').replace(' now', ' on rank 0')}")

    def summary(self) -> dict:
        """For the run report: what this rank took part in."""
        out = {"world_size": self.world, "backend": self.backend, "bytes_all_reduced": self.bytes_reduced,
               "collectives": self.collectives}
        if self.solved[1]:
            out["rows_solved_here"], out["rows_solved_in_all"] = self.solved
        return out

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


_CURRENT: list[Comm] = [Comm()]


def current() -> Comm:
    """The run's Comm (world size 1 unless `activate` set one)."""
    return _CURRENT[-1]


@contextmanager
def activate(comm: Comm) -> Iterator[Comm]:
    _CURRENT.append(comm)
    try:
        yield comm
    finally:
        _CURRENT.pop()


def launched() -> bool:
    """Started by torchrun (or anything setting its variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env(device: str = "cpu") -> Comm:
    """The Comm torchrun's environment describes; world size 1 without it. gloo for a CPU
    `device`, nccl for CUDA (each rank on cuda:LOCAL_RANK)."""
    if not launched():
        return Comm()
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing[0]} is not set: start the ranks with torchrun "
                         "(or `qtool quantize --nproc N`)")
    import torch.distributed as dist

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: rank {rank} needs GPU {local}, this machine has "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
        torch.cuda.set_device(local)
        backend, buf = "nccl", torch.device("cuda", local)
    elif dev.type == "cpu":
        backend, buf = "gloo", torch.device("cpu")
    else:
        raise UsageError(f"--device {device}: runs over several processes use gloo (cpu) or nccl (cuda)")
    timeout = datetime.timedelta(seconds=float(os.environ.get("QTOOL_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    comm = Comm(rank, world, local, backend, buf)
    comm._call("the rendezvous", dist.init_process_group, backend=backend, timeout=timeout)
    return comm


# -- data-parallel statistics --------------------------------------------------------------------------
def reduce_collector(c, comm: Comm | None = None) -> None:
    """A HessianCollector's sums over every rank's windows (engine/blockwise.py): owner maps and
    first-seen order merged (a linear one rank's windows never reached, an MoE expert, takes the
    other ranks' figures), token counts summed, Σ XᵀX / Σ x² / Σ |x| (float64 partials) summed,
    max |x| maximised. Every rank ends with the same collector."""
    comm = comm or current()
    if not comm.active:
        return
    sums = {"sum": c.sum, "sum_x2": c.sum_x2, "sum_abs": c.sum_abs, "max_abs": c.max_abs}
    shapes = {k: {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in d.items()} for k, d in sums.items()}
    metas = comm.all_gather_object((c.order, c.owner, c.tokens, shapes), what="the statistics exchange")
    order, owner, tokens = [], {}, {}
    merged: dict[str, dict] = {k: {} for k in sums}
    for o, own, tok, shp in metas:
        order += [n for n in o if n not in order]
        for n, v in own.items():
            owner.setdefault(n, v)
        for n, v in tok.items():
            tokens[n] = tokens.get(n, 0) + v
        for k in sums:
            for n, s in shp[k].items():
                merged[k].setdefault(n, s)
    dev = next((t.device for d in sums.values() for t in d.values()), comm.device)
    for k, d in sums.items():
        for n in sorted(merged[k]):
            shape, dtype = merged[k][n]
            t = d.get(n)
            if t is None:
                t = torch.zeros(shape, dtype=getattr(torch, dtype), device=dev)
                if k == "max_abs":
                    t.fill_(0)  # |x| >= 0: zero is max's identity here
            d[n] = comm.all_reduce(t, "max" if k == "max_abs" else "sum", what="the statistics all-reduce")
    c.order, c.owner, c.tokens = order, owner, tokens
