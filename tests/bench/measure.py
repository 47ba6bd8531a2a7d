"""Run one command as a child process and measure it: wall time, peak RSS, and a breakdown.

Peak RSS comes from the kernel's own accounting of *that* child (`os.wait4` returns the rusage of
the one process it reaps, so no other run is ever included). While the child runs, its
/proc/PID/status is sampled to record the peaks of the three parts of RSS: anonymous memory
(heap, tensors), file-backed pages (mmap'd checkpoints, shared libraries) and shmem. The sampled
peaks can miss a short spike; `peak_rss_bytes` (from the kernel) cannot.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SAMPLE_S = 0.05
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


@dataclass
class Measured:
    cmd: list[str]
    returncode: int
    wall_s: float
    peak_rss_bytes: int  # ru_maxrss of the child, from the kernel
    sampled_peaks_bytes: dict[str, int] = field(default_factory=dict)  # VmRSS/RssAnon/RssFile/RssShmem
    stdout: str = ""
    stderr: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stdout"] = d["stdout"][-2000:]
        d["stderr"] = d["stderr"][-2000:]
        return d


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in STATUS_FIELDS:
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def run_measured(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Measured:
    """Run `cmd` to completion; stdout/stderr go to temporary files (no pipe can fill up)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        peaks = {k: 0 for k in STATUS_FIELDS}
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            for k, v in _status_kib(proc.pid).items():
                peaks[k] = max(peaks[k], v)
            time.sleep(SAMPLE_S)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen consistent
        out.seek(0)
        err.seek(0)
        return Measured(
            cmd=[str(c) for c in cmd],
            returncode=proc.returncode,
            wall_s=wall,
            peak_rss_bytes=usage.ru_maxrss * 1024,  # Linux reports KiB
            sampled_peaks_bytes={k: v * 1024 for k, v in peaks.items()},
            stdout=out.read(),
            stderr=err.read(),
        )
