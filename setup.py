"""Build the Cython kernels. Everything else lives in pyproject.toml."""
import os
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

# MNISTGAN_DEBUG=1: a debug build for .ci/asan -- no optimisation, Cython's
# own checks on, and AddressSanitizer, which traps any out-of-bounds access
# the raw-pointer kernels could make.
DEBUG = os.environ.get("MNISTGAN_DEBUG", "") not in ("", "0")

directives = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}

if sys.platform == "win32":
    compile_args = ["/O2"]
else:
    # -fno-math-errno lets gcc vectorise sqrt (we never read errno), and
    # -fno-trapping-math lets it turn float compares into vector selects (we
    # never read the floating-point exception flags). Neither changes results.
    compile_args = (["-O0", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"] if DEBUG
                    else ["-O3", "-fno-math-errno", "-fno-trapping-math"])
if sys.platform.startswith("linux"):
    # Strip the symbol tables from the release build: the wheel shrinks ~4x.
    link_args = ["-fsanitize=address"] if DEBUG else ["-s"]
else:
    link_args = []

extensions = [
    Extension(
        "mnistgan._kernels",
        ["src/mnistgan/_kernels.pyx"],
        include_dirs=[np.get_include(), "src/mnistgan"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        depends=["src/mnistgan/_fastmath.h", "src/mnistgan/_sgemm.h", "src/mnistgan/_sync.h"],
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
