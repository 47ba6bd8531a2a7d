"""The optional C extension: qtool/kernels/_ggml_blocks.c (the GGUF block quantizers' CPU backend).

Everything else is declared in pyproject.toml. A failed compile (no compiler, no Python headers)
is reported and skipped: qtool then runs the pure-torch reference (qtool/kernels/ggml_cpu.py finds
no library). QTOOL_NO_EXTENSIONS=1 skips the build on purpose.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Exact float32 arithmetic is the contract (byte-equal to the torch reference): no fused
# multiply-adds, no fast-math reassociation.
if sys.platform == "win32":
    ARGS = ["/O2", "/fp:strict", "/DQTOOL_PYTHON_MODULE"]
else:
    ARGS = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-fast-math", "-Wno-psabi", "-DQTOOL_PYTHON_MODULE"]


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any build failure means: no extension
            print(f"qtool: C kernels not built ({e}); the torch reference will be used", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"qtool: {ext.name} not built ({e}); the torch reference will be used", file=sys.stderr)


ext_modules = []
if not os.environ.get("QTOOL_NO_EXTENSIONS"):
    ext_modules.append(Extension("qtool.kernels._ggml_blocks", ["qtool/kernels/_ggml_blocks.c"],
                                 extra_compile_args=ARGS, optional=True))

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
