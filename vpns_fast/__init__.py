"""vpns_fast: kernel-accelerated VPNs (visual prompts + weight masks for sparsification)."""
from __future__ import annotations

import importlib.util as _ilu
import os as _os

__version__ = "0.1.0"

# Installed (regular or editable), `kernels/` is the subpackage `vpns_fast.kernels`. Run from a
# source tree with PYTHONPATH=. it is a sibling folder: let this package's path reach it.
if _ilu.find_spec("vpns_fast.kernels") is None:  # pragma: no cover - depends on how it is run
    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")):
        __path__.append(_root)  # noqa: F821 - the package's own __path__
