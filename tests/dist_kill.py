"""One rank of a `qtool ... --nproc N` run SIGKILLs itself at a chosen point (tests/test_distributed.py).

The launcher (qtool/cli/launch.py) runs this script in every rank instead of `-m qtool` when
QTOOL_DIST_ENTRY names it. QTOOL_KILL_RANK picks the rank; QTOOL_KILL_POINT is
`checkpoint:K` (right after the resume checkpoint holds K complete blocks) or `round:K` (a
calibration-free run: before the K-th exchange of quantized tensors) or `atexit` (SIGABRT once the
command returned, as a crash in gloo's teardown would); QTOOL_KILL_HOW=exit makes
the rank exit with code 1 there instead, outside qtool's error handling (as an exception in
torch's own threads or at interpreter shutdown would: a Python error line, no qtool record)."""

import os
import sys

from kill_points import die as sigkill  # this script's folder (tests/) is first on sys.path when it runs


def die() -> None:
    if os.environ.get("QTOOL_KILL_HOW") == "exit":
        sys.stderr.write("RuntimeError: dist_kill.py stops this rank outside qtool's error handling\n")
        sys.stderr.flush()
        os._exit(1)
    sigkill()


def install(point: str) -> None:
    kind, _, arg = point.partition(":")
    if kind == "checkpoint":
        from qtool.engine import dist_pipeline as dp

        real = dp.DistCheckpoint.save

        def save(self, b, *a, **kw):
            real(self, b, *a, **kw)
            if b + 1 == int(arg):
                die()

        dp.DistCheckpoint.save = save
    elif kind == "round":
        from qtool.engine import dist_pipeline as dp

        real_round = dp._Dealer.next_round

        def next_round(self):
            if self.round + 1 == int(arg):
                die()
            real_round(self)

        dp._Dealer.next_round = next_round
    elif kind == "atexit":  # after the command returned: the rank aborts while exiting
        import atexit

        atexit.register(os.abort)
    else:
        raise SystemExit(f"dist_kill.py: unknown point {point!r}")


if __name__ == "__main__":
    if os.environ.get("RANK") == os.environ.get("QTOOL_KILL_RANK"):
        install(os.environ["QTOOL_KILL_POINT"])
    from qtool.cli.main import main

    sys.argv = ["qtool", *sys.argv[1:]]
    main()
