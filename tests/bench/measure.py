"""Run one command as a child process and measure it: wall time, peak RSS, and a breakdown.

Why a helper process: on Linux a child's `ru_maxrss` starts from the RSS of the process it was
forked from (exec keeps the high-water mark of the forked/borrowed address space). Forking
`qtool quantize` straight from the benchmark, which holds a model and a tokenizer, would report the
benchmark's size. So `run_measured` starts this file as a fresh, small helper (`python -S`,
stdlib only, ~10 MB), and the helper forks the measured command, reaps it with `os.wait4` (the
rusage of that one child, so no other run is ever included) and writes the result as JSON.

While the child runs, the helper samples /proc/PID/status for the peaks of the parts of RSS:
anonymous memory (heap, tensors), file-backed pages (mmap'd checkpoints, shared libraries) and
VmHWM (the child's own high-water mark). Samples can miss a short spike; ru_maxrss cannot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SAMPLE_S = 0.05
STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


@dataclass
class Measured:
    cmd: list[str]
    returncode: int
    wall_s: float
    peak_rss_bytes: int  # ru_maxrss of the child, from the kernel
    cpu_s: float = 0.0  # user + system CPU of the child (and its reaped children), from the same wait4
    sampled_peaks_bytes: dict[str, int] = field(default_factory=dict)  # see STATUS_FIELDS
    stdout: str = ""
    stderr: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stdout"] = d["stdout"][-2000:]
        d["stderr"] = d["stderr"][-2000:]
        return d


def run_measured(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Measured:
    """Measure `cmd` from a fresh helper process (see the module doc); stdout/stderr are captured."""
    with tempfile.TemporaryDirectory(prefix="qtool-bench-") as d:
        result = Path(d) / "result.json"
        helper = [sys.executable, "-S", str(Path(__file__).resolve()), str(result), "--", *map(str, cmd)]
        done = subprocess.run(helper, env=env, cwd=cwd, capture_output=True, text=True)
        if done.returncode != 0 or not result.is_file():
            raise RuntimeError(f"measure helper failed ({done.returncode}): {done.stderr[-2000:]}")
        return Measured(**json.loads(result.read_text()))


# -- the helper side -------------------------------------------------------------------------------
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


def measure_here(cmd: list[str]) -> Measured:
    """Run `cmd` as a direct child of this process; stdout/stderr go to temporary files."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
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
            cmd=list(cmd),
            returncode=proc.returncode,
            wall_s=wall,
            peak_rss_bytes=usage.ru_maxrss * 1024,  # Linux reports KiB
            cpu_s=usage.ru_utime + usage.ru_stime,
            sampled_peaks_bytes={k: v * 1024 for k, v in peaks.items()},
            stdout=out.read(),
            stderr=err.read(),
        )


def _helper_main(argv: list[str]) -> int:
    result, sep, *cmd = argv
    if sep != "--" or not cmd:
        print("usage: measure.py RESULT.json -- CMD [ARGS...]", file=sys.stderr)
        return 2
    Path(result).write_text(json.dumps(asdict(measure_here(cmd))))
    return 0


if __name__ == "__main__":
    sys.exit(_helper_main(sys.argv[1:]))
