"""Loads the C++ extension ``vpns_fast._C`` (built from ``csrc/`` by setup.py).

The library works without it through its PyTorch paths; ``status()`` says why it is absent.
"""
from __future__ import annotations

_module = None
_reason = ""
_tried = False


def load():
    """The extension module, or None when it is not built or fails to load."""
    global _module, _reason, _tried
    if not _tried:
        _tried = True
        try:
            import torch  # noqa: F401 - the extension links against libtorch

            from vpns_fast import _C

            _module = _C
        except ImportError as exc:
            import importlib.util
            import sys

            torch_version = getattr(sys.modules.get("torch"), "__version__", "(torch not importable)")
            if importlib.util.find_spec("vpns_fast._C") is not None:
                # the file is there but does not load: an extension links against the libtorch it was compiled
                # with, and "not built" sent a user with another torch to the wrong fix (an outside review)
                _reason = (f"the C++ extension vpns_fast._C is built but does not load with torch "
                           f"{torch_version} ({exc}); it was most likely compiled against another torch: "
                           "rebuild it in this environment, e.g. `pip install -e . --no-build-isolation`")
            elif _in_source_tree():
                # an installed wheel hidden by the checkout Python found first (an outside review: "reinstall"
                # sent a user whose installed copy had the extension the wrong way)
                import os

                here = os.path.dirname(os.path.abspath(__file__))
                _reason = (f"the C++ extension vpns_fast._C is not built in the source tree vpns_fast was imported "
                           f"from ({here}): build it there with `pip install -e . --no-build-isolation`, or, where "
                           "a built copy is installed, run from another folder (the tree hides it)")
            else:
                _reason = (f"the C++ extension vpns_fast._C is not built ({exc}); reinstall without "
                           f"VPNS_FAST_BUILD_EXT=0, e.g. `pip install -e . --no-build-isolation`")
    return _module


def status() -> tuple[bool, str]:
    return (load() is not None), _reason


def _in_source_tree() -> bool:
    """Whether ``vpns_fast`` was imported from a source checkout (its folder beside ``csrc/`` and ``setup.py``)."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.isdir(os.path.join(root, "csrc")) and os.path.isfile(os.path.join(root, "setup.py"))
