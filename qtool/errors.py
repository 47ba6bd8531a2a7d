"""Typed errors. Each carries the process exit code the CLI maps it to (one place: cli/_app.py).

Messages are one line and name the bad file, tensor or option, and where possible the allowed values.
"""

from __future__ import annotations


class QtoolError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(QtoolError):
    """A bad option value or combination that can be judged from the flags alone."""

    exit_code = 2


class UnsupportedError(QtoolError):
    """A valid request that this model, method or format cannot do (architecture, group size...)."""

    exit_code = 3


class NumericalError(QtoolError):
    """NaN/Inf in a weight, a factorisation that failed..."""

    exit_code = 4


class FormatError(QtoolError):
    """A file that is missing, unreadable, corrupted or of the wrong kind; an output that exists."""

    exit_code = 5


class Interrupted(QtoolError):
    """Ctrl-C (or SIGTERM) during a run; the message says what survives (a resume checkpoint)."""

    exit_code = 130


EXIT_CODES = {
    0: "success",
    1: "internal error (a bug; rerun with --debug and report it)",
    2: "usage error: a bad option value or combination",
    3: "unsupported: this model, method or format cannot do what was asked",
    4: "numerical failure: NaN/Inf in a weight, a factorisation that failed",
    5: "I/O or format error: missing, corrupted or existing file",
    6: "distributed: a rank of a run over several processes was killed or lost (--nproc, torchrun)",
    130: "interrupted",
}
