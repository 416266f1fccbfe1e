"""Builds the C++ CPU extension ``vpns_fast._C`` from ``csrc/``; metadata lives in pyproject.toml.

Set ``VPNS_FAST_BUILD_EXT=0`` to skip the build: the library then runs on its PyTorch paths.
Set ``VPNS_FAST_DEBUG_INFO=1`` to keep the compiler's debug information in the extension (for line-level
profiles): without it the build passes ``-g0``, since Python's own CFLAGS carry ``-g``, and the debug
information made 35.5 MB of a 36.5 MB extension whose code and data are 1 MB (2026-12-07).
Build with ``pip install --no-build-isolation`` so the extension links against the torch that
is already installed (an isolated build would fetch a second, multi-GB torch).
"""
import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("VPNS_FAST_BUILD_EXT", "1") != "0":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(CppExtension(
        name="vpns_fast._C",
        sources=sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
        extra_compile_args=["-O3", "-fopenmp"] + ([] if os.environ.get("VPNS_FAST_DEBUG_INFO") == "1" else ["-g0"]),
        extra_link_args=["-fopenmp"],
    ))
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
