"""Builds the C++ CPU extension ``vpns_fast._C`` from ``csrc/``; metadata lives in pyproject.toml.

Set ``VPNS_FAST_BUILD_EXT=0`` to skip the build: the library then runs on its PyTorch paths.
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
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    ))
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
