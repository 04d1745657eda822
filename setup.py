"""The compiled part of the package: the CPU convolution kernels of the U-Net, an XLA FFI
extension (cryojax_mw/nn/_winograd_cpu.cc). Everything else is declared in pyproject.toml.

The extension is optional: without a C++ compiler the package installs and the U-Net uses
lax.conv_general_dilated on the CPU too (with a warning when it is imported).
"""

import os

import jaxlib
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cryojax_mw.nn._winograd_cpu",
            sources=["cryojax_mw/nn/_winograd_cpu.cc"],
            include_dirs=[os.path.join(os.path.dirname(jaxlib.__file__), "include")],
            language="c++",
            # gnu++17: GCC's vector extensions and floating-point contraction into FMAs.
            extra_compile_args=["-std=gnu++17", "-O3", "-g0", "-fno-math-errno", "-Wno-psabi"],
            optional=True,
        )
    ]
)
