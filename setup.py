"""Builds fp8conv's one compiled extension (fp8conv/accel/_native.c); everything else is in pyproject.toml.

The extension is optional: where it cannot be compiled (no C compiler, no Python headers) the
install still succeeds and fp8conv runs its numpy reference kernels, saying so in one warning line.
"""
from __future__ import annotations

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Bit-identical to the numpy reference: no fast-math, no fused multiply-add contraction.
if sys.platform == "win32":
    FLAGS = ["/O2", "/fp:precise"]
else:
    FLAGS = ["-O3", "-std=c99", "-fno-fast-math", "-ffp-contract=off"]


class OptionalBuildExt(build_ext):
    """build_ext that reports a failed compile and goes on (the numpy kernels then run)."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # distutils raises several unrelated classes (CompileError, PlatformError...)
            self._skip(exc)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(exc)

    @staticmethod
    def _skip(exc: Exception) -> None:
        print(f"warning: fp8conv's C kernels were not built ({exc}); fp8conv will run its numpy kernels. "
              "Install a C compiler and the Python headers, then reinstall, for the fast path.", file=sys.stderr)


setup(
    ext_modules=[Extension("fp8conv.accel._native", ["fp8conv/accel/_native.c"], extra_compile_args=FLAGS)],
    cmdclass={"build_ext": OptionalBuildExt},
)
