"""Atomic outputs and input hashing. An output appears under its final name only when complete."""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qtool.errors import FormatError


def check_output_free(final: Path, overwrite: bool) -> None:
    if final.exists() and not overwrite:
        raise FormatError(f"{final}: already exists; pass --overwrite to replace it")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink(missing_ok=True)


@contextmanager
def atomic_output(final: Path, *, overwrite: bool = False, is_dir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it into place, on any failure
    (including Ctrl-C) delete it. An existing `final` is refused unless `overwrite`."""
    final = final.expanduser()
    check_output_free(final, overwrite)
    parent = final.parent if str(final.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FormatError(f"{parent}: cannot create output folder: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise FormatError(f"{parent}: not writable")
    remove_stale_partials(final)
    tmp = parent / f".{final.name}.qtool-partial-{os.getpid()}"
    _remove(tmp)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    old = None
    if final.exists():
        old = parent / f".{final.name}.qtool-old-{os.getpid()}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        _remove(old)


def remove_stale_partials(final: Path) -> list[Path]:
    """Delete the temporaries of earlier runs for `final` whose process is gone (a `kill -9` or a
    power cut gives a run no chance to clean up); a live process's temporary is left alone."""
    removed = []
    parent = final.parent if str(final.parent) else Path(".")
    for p in parent.glob(f".{final.name}.qtool-partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(p)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sha256_file(path: Path, chunk: int = 1 << 22, cancelled=None) -> str:
    """`cancelled`: a threading.Event that stops the read early (the digest is then meaningless)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
            if cancelled is not None and cancelled.is_set():
                break
    return h.hexdigest()


class BackgroundHashes:
    """sha256 of files in a daemon thread while the caller works: file reads and hashlib's update
    release the GIL, so on a multi-core machine the hash of a multi-GB checkpoint costs little wall
    time beside the quantization instead of after it. `result()` joins and re-raises its error."""

    def __init__(self, files: list[Path]) -> None:
        import threading

        self._files, self._out, self._error = list(files), {}, None
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qtool-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for f in self._files:
                self._out[f] = sha256_file(f, cancelled=self._cancel)
        except BaseException as e:  # noqa: BLE001 - handed to result()
            self._error = e

    def result(self) -> dict[Path, str]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out

    def cancel(self) -> None:
        self._cancel.set()
