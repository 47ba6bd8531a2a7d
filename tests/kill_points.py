"""Run the qtool CLI and SIGKILL the process itself at a chosen point (a real `kill -9`: no
handler, no `finally`, no cleanup), for tests/test_resume.py and tests/test_kill9.py.

usage: python kill_points.py POINT qtool-args...
POINT: checkpoint:K   right after the resume checkpoint holds K complete blocks
       tensor:N       when the writer is handed its N-th tensor (quantized or not)
       finish         right after the writer finished its files, before the model card and rename
       rename         just before the temporary output is renamed into place
"""

import os
import signal
import sys
from pathlib import Path


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    kind, _, arg = point.partition(":")
    if kind == "checkpoint":
        from qtool.engine import checkpoint as ck

        real = ck.BlockCheckpoint.save

        def save(self, b, *a, **kw):
            real(self, b, *a, **kw)
            if b + 1 == int(arg):
                die()

        ck.BlockCheckpoint.save = save
    elif kind == "tensor":
        from qtool import pipeline

        count = {"n": 0}
        for fn in ("_add_tensor", "_write_quantized"):
            real_fn = getattr(pipeline, fn)

            def wrapped(*a, _real=real_fn, **kw):
                count["n"] += 1
                if count["n"] == int(arg):
                    die()
                return _real(*a, **kw)

            setattr(pipeline, fn, wrapped)
    elif kind == "finish":
        from qtool.formats.base import FormatWriter

        def on_finish(cls):
            real = cls.__dict__.get("finish")
            if real is None:
                return

            def finish(self, *a, **kw):
                real(self, *a, **kw)
                die()

            cls.finish = finish

        def walk(cls):
            for sub in cls.__subclasses__():
                on_finish(sub)
                walk(sub)

        import qtool.formats  # noqa: F401  (registers every writer)

        walk(FormatWriter)
    elif kind == "rename":
        real_rename = Path.rename

        def rename(self, target):
            if ".qtool-partial-" in self.name:
                die()
            return real_rename(self, target)

        Path.rename = rename
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    from qtool.cli.main import main

    sys.argv = ["qtool", *sys.argv[2:]]
    main()
