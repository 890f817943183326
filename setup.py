"""Builds lfm_kernels._C, the CPU extension, against the torch that is already installed.

Every op lives in its own translation unit under csrc/; the AVX2+FMA code inside them is compiled
with per-function target attributes and chosen at run time, so the whole extension is built for
the baseline x86-64 ISA and a wheel made on an AVX2 machine still loads on one without AVX2.
If the extension cannot be compiled (no C++ compiler, say) the package installs without it and
every op runs its eager reference, with one warning at import.
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # pragma: no cover - build-time guard
    sys.exit(
        "lfm-kernels compiles its CPU extension against the installed torch, and none is installed.\n"
        "Install torch first (e.g. `pip install torch`), then build without isolation so the build\n"
        "uses that torch instead of downloading another one:\n"
        "    pip install --no-build-isolation .\n"
    )


class OptionalBuildExt(BuildExtension):
    """A failed compile leaves the pure-Python package installable (ops fall back to references)."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure must not break the install
            if os.environ.get("LFM_KERNELS_REQUIRE_EXTENSION") == "1":
                raise
            print(f"WARNING: lfm_kernels._C was not built ({exc}); ops will use the eager references.")


def _extensions():
    if sys.platform == "win32" or os.environ.get("LFM_KERNELS_NO_EXTENSION") == "1":
        return []
    debug = os.environ.get("LFM_KERNELS_DEBUG") == "1"
    sanitize = os.environ.get("LFM_KERNELS_SANITIZE")  # e.g. "address,undefined"
    cxx = ["-O1" if sanitize else "-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    link = ["-fopenmp"]
    if debug or sanitize:
        cxx += ["-g", "-fno-omit-frame-pointer"]
    if sanitize:
        cxx += [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all"]
        link += [f"-fsanitize={sanitize}"]
    return [
        CppExtension(
            "lfm_kernels._C",
            sorted(glob.glob("csrc/*.cpp")),
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    ]


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": OptionalBuildExt.with_options(use_ninja=True)},
)
