"""``triton`` and ``triton.language`` when installed, else stand-ins that let kernel files import.

The references in each kernel file must work wherever torch does (triton ships for Linux
only); the stand-ins make ``@triton.jit`` and friends no-ops, and the ``triton`` backend's probe
reports triton as unavailable, so no stand-in kernel is ever launched.
"""
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is not installed
    HAS_TRITON = False

    class _StandIn:
        """Any attribute or call yields a stand-in; used as a decorator it returns the function."""

        def __getattr__(self, name):
            return _StandIn()

        def __call__(self, *args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]
            return _StandIn()

    triton = _StandIn()
    tl = _StandIn()

__all__ = ["HAS_TRITON", "triton", "tl"]
