"""Native extension build; project metadata lives in pyproject.toml.

The kernels link against pybind11 only (never torch headers), so an isolated pip build does
not have to pull a torch wheel.  No -march flags: the source multiversions its hot loops
(AVX-512 / AVX2 / baseline on x86-64, NEON baseline on aarch64) so one wheel runs anywhere.
"""

import os
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext, has_flag
from setuptools import setup

_OPENMP_PROBE = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


def _links_openmp(compiler, flag: str) -> bool:
    """Compile and link a tiny OpenMP program: Apple clang without libomp fails here."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(_OPENMP_PROBE)
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
            compiler.link_executable(objs, os.path.join(tmp, "probe"), extra_postargs=[flag])
        except Exception:
            return False
    return True


class BuildExt(build_ext):
    """GCC/Clang flags; OpenMP where the toolchain links it, else the kernels run single-threaded."""

    def build_extensions(self) -> None:
        # -ffp-contract=fast: FMA contraction, which ISO -std=c++17 mode would otherwise turn off.
        flags = ["-O3", "-ffp-contract=fast"]
        openmp = _links_openmp(self.compiler, "-fopenmp")
        if not openmp:
            print("warning: OpenMP not available; packed kernels will be single-threaded")
        # -Wno-psabi: GCC notes the ABI of 512-bit vector arguments even on always-inline helpers.
        for quiet in ["-Wno-psabi"] + ([] if openmp else ["-Wno-unknown-pragmas"]):
            if has_flag(self.compiler, quiet):
                flags.append(quiet)
        for ext in self.extensions:
            ext.extra_compile_args += flags + (["-fopenmp"] if openmp else [])
            ext.extra_link_args += ["-fopenmp"] if openmp else []
        super().build_extensions()


setup(
    ext_modules=[
        Pybind11Extension(
            "dress_model.kernels._packed_sparse",
            ["dress_model/kernels/csrc/packed_sparse.cpp"],
            cxx_std=17,
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
