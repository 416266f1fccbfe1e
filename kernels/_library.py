"""One way to define the ``torch.library`` custom ops of the kernel files.

Each launcher that ``torch.compile`` must treat as an opaque call is decorated where it is
written::

    @custom_op("vpns_fast::masked_weight", schema="(Tensor weight, ...) -> Tensor",
               fake=_masked_weight_fake, backward=..., setup_context=...)
    def masked_weight_fwd(weight, scores, threshold): ...

The decorated function itself is returned unchanged (direct calls launch the kernel without
going through the dispatcher); the op is reached as ``torch.ops.vpns_fast.<name>``. Schemas are
always written out: the kernel files postpone annotation evaluation, so torch cannot infer them.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

Impl = TypeVar("Impl", bound=Callable)


def is_defined(name: str) -> bool:
    """Whether ``namespace::op`` is already registered in this process."""
    namespace, op = name.split("::")
    try:
        getattr(getattr(torch.ops, namespace), op)
    except (AttributeError, RuntimeError):
        return False
    return True


def custom_op(name: str, *, schema: str, fake: Callable, backward: Callable | None = None,
              setup_context: Callable | None = None) -> Callable[[Impl], Impl]:
    """Decorator: define the functional (non-mutating) custom op ``name`` with ``schema``,
    implemented by the decorated function, with its fake (meta) implementation and, when given,
    its autograd formula (``backward(ctx, *grads)`` and ``setup_context(ctx, inputs, output)``,
    as :meth:`torch.library.CustomOpDef.register_autograd` takes them).

    An op already defined is left as it is: a kernel file imported under a second module name
    must not define it twice (torch refuses)."""
    if (backward is None) != (setup_context is None):
        raise ValueError(f"{name}: give both backward and setup_context, or neither")

    def define(impl: Impl) -> Impl:
        if not is_defined(name):
            op = torch.library.custom_op(name, impl, mutates_args=(), schema=schema)
            op.register_fake(fake)
            if backward is not None:
                op.register_autograd(backward, setup_context=setup_context)
        return impl

    return define
