"""Build the optional native CPU kernel library (``bpdq/kernels/native/cpu_lut.c``) with the system compiler.

The library is plain C loaded through ``ctypes`` (no Python or torch C API), so one build serves any torch
version. The extension is optional: without a compiler, or if the build fails, the install still succeeds and
``bpdq`` falls back to the ``torch`` kernel (with one warning saying why). Everything else is in pyproject.toml.
"""

import sys

from setuptools import Extension, setup

compile_args = [] if sys.platform == "win32" else ["-O3", "-std=c11", "-pthread", "-fvisibility=default"]
link_args = [] if sys.platform == "win32" else ["-pthread"]

setup(
    ext_modules=[
        Extension(
            "bpdq.kernels._cpu_lut_native",
            sources=["bpdq/kernels/native/cpu_lut.c"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            optional=True,
        )
    ]
)
