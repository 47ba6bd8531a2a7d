"""Runs over several processes from the CLI's side.

`qtool quantize|calibrate --nproc N` (N > 1, not already under torchrun) starts torchrun on this
machine with the same command minus `--nproc` (`python -m torch.distributed.run --standalone
--nproc-per-node N -m qtool ...`), waits, and turns a failure into one line naming the rank and
the cause. Under torchrun (started by us or by the user: `torchrun --nproc-per-node N -m qtool
quantize ...`) each rank joins the process group (`session`); ranks other than 0 print nothing
on success, and every rank's error line is prefixed with its rank and also recorded for the
launcher (QTOOL_DIST_ERRORS, a folder the launcher made).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from qtool.errors import QtoolError, UsageError

ERRORS_ENV = "QTOOL_DIST_ERRORS"
ENTRY_ENV = "QTOOL_DIST_ENTRY"  # a script each rank runs instead of `-m qtool` (tests: tests/dist_kill.py)


class LaunchFailed(QtoolError):
    """A run over several processes failed; the message is the failing rank's line, the exit code its."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = code


def run_launched(nproc: int) -> None:
    """`--nproc N` outside torchrun: the whole command again under torchrun; raises LaunchFailed.
    A run whose every rank finished its work but one died while exiting succeeds, with a warning."""
    code, line = launch(nproc)
    if code:
        raise LaunchFailed(code, line or "the distributed run failed")
    if line:
        from qtool.cli._app import err

        err.print(f"warning: {line}", markup=False, soft_wrap=True)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def launched() -> bool:
    from qtool.engine.distributed import launched as under_torchrun

    return under_torchrun()


@contextmanager
def session(device: str | None) -> Iterator[object]:
    """The run's Comm for the duration of one command (world size 1 outside torchrun)."""
    from qtool.engine.distributed import activate, init_from_env

    if launched():
        signal.signal(signal.SIGTERM, _terminated)  # torchrun stops the other ranks with SIGTERM: clean up as for Ctrl-C
    comm = init_from_env(device or "cpu")
    try:
        with activate(comm):
            yield comm
        if comm.active:  # every rank's work is done (rank 0's output complete) before any rank tears down
            comm.barrier("the end of the run")
            _mark_done()
    finally:
        comm.close()


def _mark_done() -> None:
    """Under the launcher: this rank finished its work (see launch: a rank that dies after every
    rank got here, e.g. in gloo's teardown at exit, leaves a complete output)."""
    folder = os.environ.get(ERRORS_ENV)
    if folder:
        try:
            Path(folder, f"rank-{rank()}.done").touch()
        except OSError:
            pass


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt


def record_failure(code: int, message: str) -> str:
    """Under torchrun: the error line prefixed with the rank, and saved for the launcher."""
    if not launched():
        return message
    r = rank()
    folder = os.environ.get(ERRORS_ENV)
    if folder:
        try:
            Path(folder, f"rank-{r}.json").write_text(json.dumps({"rank": r, "code": code, "message": message}))
        except OSError:
            pass
    return message if message.startswith(f"rank {r}:") else f"rank {r}: {message}"


def check_nproc(nproc: int, windows: int | None) -> None:
    """From the flags: --nproc at least 1, and no more ranks than calibration windows to share."""
    if nproc < 1:
        raise UsageError(f"--nproc {nproc}: need at least 1 process")
    if windows is not None and nproc > windows:
        raise UsageError(f"--nproc {nproc}: only {windows} calibration window(s) (--samples {windows}) to share; at most --nproc {windows}")
    if launched() and nproc not in (1, int(os.environ["WORLD_SIZE"])):
        raise UsageError(f"--nproc {nproc}: already running under torchrun with {os.environ['WORLD_SIZE']} processes")


def strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def launch(nproc: int, argv: list[str] | None = None) -> tuple[int, str | None]:
    """Start `nproc` ranks of this command under torchrun; -> (exit code, the one error line or None).
    The ranks' stdout passes through (rank 0's summary or JSON); their stderr is kept and, on a
    failure, boiled down to the line of the rank that failed first (a rank killed by a signal, or
    one whose error is its own rather than a lost peer)."""
    args = strip_nproc(list(sys.argv[1:] if argv is None else argv))
    if not any(a in ("quantize", "calibrate") for a in args):
        raise UsageError("--nproc: run qtool as a command (`qtool quantize ... --nproc N`)")
    entry = os.environ.get(ENTRY_ENV)
    target = [entry] if entry else ["-m", "qtool"]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    with tempfile.TemporaryDirectory(prefix="qtool-dist-") as errors:
        env[ERRORS_ENV] = errors
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target, *args]
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
        try:
            _, stderr = proc.communicate()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate()
            return 130, "interrupted; every rank was stopped"
        if proc.returncode == 0:
            return 0, None
        records = {}
        for f in Path(errors).glob("rank-*.json"):
            try:
                d = json.loads(f.read_text())
                records[int(d["rank"])] = d
            except (OSError, ValueError, KeyError):
                pass
        done = len(list(Path(errors).glob("rank-*.done")))
    from qtool.cli._app import debug_enabled

    if debug_enabled():  # `qtool --debug` or QTOOL_DEBUG=1: the ranks' own output, tracebacks included
        sys.stderr.write(stderr)
    f = failure(records, stderr, nproc)
    if not records and done == nproc:  # every rank's work was done: the failure is in a rank's exit
        who = f"rank {f.rank} of {nproc} {f.what}" if f.rank is not None else "torchrun reported a failure"
        return 0, f"{who} after every rank had finished its work; the output is complete"
    return f.code, f.line


_SECONDARY = ("lost the other ranks", "interrupted")
_EXIT = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank[^)]*\)\s*\n\s*exitcode\s*:\s*(-?\d+)")
_PY_ERROR = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception)|Fatal Python error)\b.*")


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


@dataclass(frozen=True)
class Failure:
    """What a failed distributed run comes down to: the rank, how it ended (`how`: its own qtool
    error, "killed" by a signal, an "exit" without a qtool error, or "unknown"), the exit code qtool
    returns, and the one line that says it."""

    code: int
    line: str
    how: str = "qtool"
    rank: int | None = None
    what: str = ""  # "killed (SIGABRT)", "exited with code 3": how the rank ended, for other sentences


def summarize(records: dict[int, dict], stderr: str, nproc: int) -> tuple[int, str]:
    """The exit code and one line for a failed run (`failure`'s)."""
    f = failure(records, stderr, nproc)
    return f.code, f.line


def failure(records: dict[int, dict], stderr: str, nproc: int) -> Failure:
    """torchrun's report names the rank that failed first (its "Root Cause"); the others were
    stopped by it (SIGTERM) or lost their peers. In order: that rank's own qtool error; a rank's
    death by a signal other than torchrun's SIGTERM (SIGKILL, SIGSEGV...); any rank's own error; the
    root rank's exit without a qtool error (with the last Python error line seen); the first error
    recorded."""
    head, _, root_part = stderr.partition("Root Cause")
    exits = {int(r): int(c) for r, c in _EXIT.findall(head)}
    roots = [(int(r), int(c)) for r, c in _EXIT.findall(root_part)]
    exits.update(roots)
    root = roots[0] if roots else None
    own = {r: d for r, d in sorted(records.items()) if not any(s in d["message"] for s in _SECONDARY)}
    # ranks that died without a qtool error: torchrun's root cause first, SIGTERM (torchrun stopping
    # the survivors) last
    dead = sorted(((r, c) for r, c in exits.items() if r not in records), key=lambda rc: (rc != root, rc[1] == -15, rc[0]))
    first = dead[0] if dead else None
    if root and root[0] in own:
        return _own(own[root[0]])
    if first and first[1] < 0 and (first == root or first[1] != -15):  # died by a signal, not stopped by torchrun
        return _killed(*first, nproc)
    if own:
        return _own(next(iter(own.values())))
    if first:
        if first[1] < 0:
            return _killed(*first, nproc)
        errors = [m.group(0).strip() for m in map(_PY_ERROR.match, stderr.splitlines()) if m and "ChildFailedError" not in m.group(0)]
        why = f": {errors[-1][:200]}" if errors else ""
        what = f"exited with code {first[1]}"
        return Failure(1, f"rank {first[0]} of {nproc} {what} without an error from qtool{why}; every rank "
                          "stopped, nothing was written (rerun with --debug for its output)", "exit", first[0], what)
    if records:
        return _own(records[min(records)])
    last = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return Failure(1, f"the distributed run failed without an error from qtool: {last[-1][:200] if last else 'no output'}", "unknown")


def _killed(r: int, code: int, nproc: int) -> Failure:
    what = f"was killed ({_signal_name(code)})"
    return Failure(6, f"rank {r} of {nproc} {what} mid-run; every rank stopped, nothing was written "
                      "(with a calibration method, rerun with --resume to continue from the last complete block)", "killed", r, what)


def _own(d: dict) -> Failure:
    code, line = _line(d)
    return Failure(code, line, "qtool", int(d["rank"]))


def _line(d: dict) -> tuple[int, str]:
    msg = d["message"]
    return int(d["code"]), msg if msg.startswith(f"rank {d['rank']}:") else f"rank {d['rank']}: {msg}"
