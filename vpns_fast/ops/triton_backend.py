"""Registers the Triton kernels of ``kernels/`` as the ``triton`` backend.

Whether they run is decided per call by the registry's probe (CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1``).
"""
from vpns_fast.kernels._triton import HAS_TRITON
from vpns_fast.ops.backends import register

if HAS_TRITON:
    # Each kernel module exposes the launcher under the op's name with the backend signature
    # documented in vpns_fast/ops/__init__.py; modules not written yet are simply absent.
    import importlib

    for module_name, op_names in (
        ("vpns_fast.kernels.prompt", ("prompt_normalize",)),
        ("vpns_fast.kernels.threshold", ("topk_threshold",)),
        ("vpns_fast.kernels.masked", ("masked_conv2d", "masked_linear", "masked_weights")),
    ):
        module = importlib.import_module(module_name)
        for op_name in op_names:
            impl = getattr(module, f"{op_name}_triton", None)
            if impl is not None:
                register("triton", op_name, impl)

    # Warm start by default: the trainer recomputes the threshold after every optimizer step over
    # the same score tensors, so the previous threshold is a good hint; the result is exact for
    # any hint (kernels/threshold.py), a stale one only costs a pass.
    from vpns_fast.kernels.threshold import ThresholdSelector, topk_threshold_triton

    _warm_selector = ThresholdSelector()

    def _topk_threshold_warm(tensors, k):
        import torch

        if torch.compiler.is_compiling():  # fake tensors have no data pointers to key on
            return topk_threshold_triton(tensors, k)
        return _warm_selector(tensors, k)

    register("triton", "topk_threshold", _topk_threshold_warm)

    # masked_conv2d: per call shape the measured faster of the implicit-GEMM conv and the fused
    # mask kernel + cuDNN (vpns_fast/ops/conv_dispatch.py); cuDNN where nothing was measured.
    from vpns_fast.ops.conv_dispatch import masked_conv2d_dispatch

    register("triton", "masked_conv2d", masked_conv2d_dispatch)
