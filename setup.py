"""The C parts of fdpass; everything else about the package is in pyproject.toml.

All are optional accelerators with the same results as their Python
counterparts (tests compare them byte for byte): if no C compiler is present
the install still succeeds and fdpass runs, slower, on the Python code paths
(`fdpass doctor` says which paths are in use).
"""

from setuptools import Extension, setup

_FLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]

setup(
    ext_modules=[
        # capture.c reads the kernel's records through bpf/fdpass.h, the one layout.
        Extension("fdpass.collector._capture", ["collector/capture.c"], depends=["bpf/fdpass.h"],
                  extra_compile_args=_FLAGS, optional=True),
        Extension("fdpass.schemas._avro_writer", ["schemas/avro_writer.c"], extra_compile_args=_FLAGS, optional=True),
        Extension("fdpass.sinks._avro_to_native", ["sinks/avro_to_native.c"], extra_compile_args=_FLAGS, optional=True),
    ],
)
