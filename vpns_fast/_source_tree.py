"""``kernels/`` as ``vpns_fast.kernels`` when the package runs from a source tree.

Installed (regular or editable), setuptools maps the top-level ``kernels/`` folder to the
subpackage ``vpns_fast.kernels``. Run from a checkout with ``PYTHONPATH=.`` (as on a machine with
no package registry), that mapping is absent: this registers exactly that one folder under that one
name, so no other top-level folder (``bench``, ``tests``) becomes importable as ``vpns_fast.<name>``.
Importing this module does it (``vpns_fast/__init__.py`` imports it first).
"""
from __future__ import annotations

import importlib.util
import os
import sys

_NAME = "vpns_fast.kernels"


def register_kernels() -> None:
    if _NAME in sys.modules or importlib.util.find_spec(_NAME) is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):  # pragma: no cover - an installed package always has its kernels
        return
    spec = importlib.util.spec_from_file_location(_NAME, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    spec.loader.exec_module(module)


register_kernels()
