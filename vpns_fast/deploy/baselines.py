"""The engines a deployer would otherwise run, on exactly the network the CPU engine runs, so that
``vpns bench-infer`` and ``bench infer`` can put the engine beside them:

* ONNX Runtime (CPU execution provider, graph optimizations on, the same thread count), on the
  network exported to ONNX by :mod:`vpns_fast.deploy.export`'s exporter; optional (``onnxruntime``);
* ``torch.compile`` (inductor with freezing: weights folded in as constants, as for inference).

Each runner takes and returns a float32 CPU tensor; each is checked against the network's own output
by the caller before it is timed.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Runner = Callable[[torch.Tensor], torch.Tensor]


def onnxruntime_version() -> str | None:
    """The installed onnxruntime's version, or None when it cannot be imported."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


# How onnxruntime_runner configures its session, for the rows that time it.
ONNXRUNTIME_SETTINGS = ("CPU execution provider, intra-op threads as torch's, inter-op 1 (sequential), all graph "
                        "optimizations, thread spinning off")


def onnxruntime_session(graph, threads: int | None = None, profile_prefix: str | None = None):
    """An ONNX Runtime session of the ONNX model ``graph`` configured as ``ONNXRUNTIME_SETTINGS`` says, with
    ``threads`` intra-op threads (default: torch's current count); ``profile_prefix``: ONNX Runtime's own per-node
    profiling on, its JSON file named from that prefix (``session.end_profiling()`` writes it)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Its worker threads otherwise spin after each run, taking the cores from whatever runs next: on the
    # 2-core machine the engine timed right after it took 16.4 ms instead of 8.5-9 ms (ResNet-18, 10%
    # kept, batch 1). Without spinning ONNX Runtime itself is 1-2% slower (17.8-18.1 vs 17.4-17.8 ms).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return onnxruntime.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])


def onnxruntime_runner(network: nn.Module, example: torch.Tensor, threads: int | None = None) -> tuple[Runner, str]:
    """``(run, how it was exported)``: ``network`` exported to ONNX (batch axis dynamic) and run by an
    :func:`onnxruntime_session` with ``threads`` intra-op threads (default: torch's current count).
    ImportError when onnxruntime (or onnx) is not installed."""
    import onnxruntime  # noqa: F401  (the ImportError before the export's work)

    from vpns_fast.deploy.export import ONNX_OPSET, onnx_model

    graph, fallback_reason = onnx_model(network.eval(), example, ONNX_OPSET)
    session = onnxruntime_session(graph, threads)
    input_name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {input_name: x.detach().contiguous().numpy()})[0])

    exporter = "torch.export" if fallback_reason is None else f"torchscript ({fallback_reason})"
    return run, exporter


def compiled_runner(network: nn.Module) -> Runner:
    """``torch.compile`` of ``network`` with inductor's freezing (compiled on the first call, under
    no_grad, which freezing needs)."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(network.eval(), dynamic=False)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return compiled(x)

    return run
