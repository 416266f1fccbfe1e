"""Registers the Triton kernels of ``kernels/`` as the ``triton`` backend.

Whether they run is decided per call by the registry's probe (CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

from vpns_fast.kernels._triton import HAS_TRITON
from vpns_fast.ops.backends import register

if HAS_TRITON:
    from vpns_fast.kernels.masked import masked_linear_triton, masked_weights_triton
    from vpns_fast.kernels.prompt import prompt_normalize_triton
    from vpns_fast.kernels.threshold import topk_threshold_layers_triton, topk_threshold_triton
    from vpns_fast.ops.conv_dispatch import masked_conv2d_dispatch

    register("triton", "prompt_normalize", prompt_normalize_triton)
    # Always cold: on an H200 the warm start measured no faster than a cold select (kernels/threshold.py).
    register("triton", "topk_threshold", topk_threshold_triton)
    # Layer scope: every layer's select in one launch per pass (a select per layer is launch-bound:
    # 5.4-7.1 ms for ResNet-18's 21 layers on an H200, against 1.8 ms for a per-layer sort; segmented,
    # 0.41 ms against 2.29 ms for the sort, bench/results/GPU.md run 3).
    register("triton", "topk_threshold_layers", topk_threshold_layers_triton)
    # masked_conv2d: per call shape the measured faster of the implicit-GEMM conv and the fused
    # mask kernel + cuDNN (vpns_fast/ops/conv_dispatch.py); cuDNN where nothing was measured.
    register("triton", "masked_conv2d", masked_conv2d_dispatch)
    register("triton", "masked_linear", masked_linear_triton)
    register("triton", "masked_weights", masked_weights_triton)
