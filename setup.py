"""Build the Cython kernels. Everything else lives in pyproject.toml."""
import os
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

# MNISTGAN_DEBUG=1 builds with bounds checking on, for the debug test run.
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
    # -fno-math-errno lets gcc vectorise sqrt; we never read errno.
    compile_args = ["-O0", "-g"] if DEBUG else ["-O3", "-fno-math-errno"]

extensions = [
    Extension(
        "mnistgan._kernels",
        ["src/mnistgan/_kernels.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=compile_args,
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
