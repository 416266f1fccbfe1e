"""Case `threshold`: ``topk_threshold(scores, density=0.1, scope)`` on ResNet score sets.

Baselines:
* ``release``    - clone, abs, cat, ``torch.kthvalue``, as the VPNs release code computes the
  threshold (it does so twice per training step; one call is timed);
* ``topk``       - ``torch.topk(..., sorted=False)`` on the smaller side of the k-th element;
* ``hydra_sort`` - HYDRA's per-layer ``sort`` of ``|s|`` then indexing (layer scope only).
All return the k-th smallest magnitude exactly, so outputs are compared with ``torch.equal``.
"""
from __future__ import annotations

import math

import torch

from bench.cases.common import Candidate, Config, VerificationError, Workload, backend_candidates
from bench.registry import SCORE_MODELS, score_shapes
from bench.timing import input_copy_count
from vpns_fast import ops

NAME = "threshold"
OP_NAME = "topk_threshold"
DENSITY = 0.1
SCOPES = ("global", "layer")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_DTYPES = {"cpu": ("float32",), "cuda": ("float32", "bfloat16")}
BASELINES = {"global": ["release", "topk"], "layer": ["release", "topk", "hydra_sort"]}
BASELINE_NAMES = ("release", "topk", "hydra_sort")  # every baseline of any config
DESCRIPTION = (f"topk_threshold(scores, density={DENSITY}) over ResNet-18/50 Conv2d+Linear score sets, "
               f"global and layer scope; baselines: release (clone+abs+cat+kthvalue), topk, hydra_sort")


def configs(device_type: str, sizes: str, dtypes: list[str] | None = None) -> list[Config]:
    chosen = [d for d in (dtypes or DEFAULT_DTYPES[device_type]) if d in SUPPORTED_DTYPES]
    points = []
    for model_name in SCORE_MODELS:
        shapes = score_shapes(model_name, sizes)
        total = sum(math.prod(shape) for shape in shapes)
        for scope in SCOPES:
            for dtype in chosen:
                points.append(Config(NAME, f"{model_name} {scope} N={total} ({len(shapes)} tensors)", dtype, "fwd",
                                     {"model": model_name, "sizes": sizes, "scope": scope, "density": DENSITY,
                                      "score_count": total, "tensor_count": len(shapes)}))
    return points


def hydra_scaled_scores(shape, dtype, device, generator) -> torch.Tensor:
    """HYDRA "scaled" score init (docs/method.md §3): ``sqrt(6 / fan_in) * W / max|W|`` with a random W,
    so magnitudes differ per layer as they do in training (never zeros, few ties in fp32)."""
    fan_in = math.prod(shape[1:])
    weight = torch.randn(shape, generator=generator, device=device)
    return (math.sqrt(6 / fan_in) * weight / weight.abs().max()).to(dtype)


# ---------------------------------------------------------------- baselines, per group of tensors

def _flat_magnitudes(group, clone: bool) -> torch.Tensor:
    return torch.cat([(s.clone() if clone else s).abs().flatten() for s in group])


def release_kthvalue(group, k):
    return torch.kthvalue(_flat_magnitudes(group, clone=True), k).values


def topk_kth_smallest(group, k):
    flat = _flat_magnitudes(group, clone=False)
    from_top = flat.numel() - k + 1  # the k-th smallest is the (N-k+1)-th largest
    if k <= from_top:
        return torch.topk(flat, k, largest=False, sorted=False).values.max()
    return torch.topk(flat, from_top, largest=True, sorted=False).values.min()


def hydra_sort(group, k):
    (scores,) = group  # HYDRA sorts each layer on its own
    sorted_magnitudes, _order = scores.abs().flatten().sort()  # HYDRA keeps the indices: part of its cost
    return sorted_magnitudes[k - 1]


def _per_scope(threshold_of_group, scope):
    def run(scores):
        groups = [scores] if scope == "global" else [[s] for s in scores]
        thresholds = []
        for group in groups:
            k = ops.kth_index(DENSITY, sum(s.numel() for s in group))
            thresholds.append(threshold_of_group(group, k) if k >= 1 else ops.keep_all_threshold(group[0]))
        return thresholds[0] if scope == "global" else torch.stack(thresholds)
    return run


def compare_exact(output, reference, impl_name):
    if not isinstance(output, torch.Tensor) or output.shape != reference.shape or output.dtype != reference.dtype:
        raise VerificationError(f"threshold: {impl_name} returned {type(output).__name__} "
                                f"{getattr(output, 'shape', '')} {getattr(output, 'dtype', '')}, expected "
                                f"shape {tuple(reference.shape)} dtype {reference.dtype}")
    if not torch.equal(output, reference):
        differ = (output != reference).nonzero().flatten()[:5].tolist()
        got = output.flatten()[differ].tolist() if differ else output
        expected = reference.flatten()[differ].tolist() if differ else reference
        raise VerificationError(f"threshold: {impl_name} differs from the release kthvalue (exact rule); first "
                                f"differing entries {differ}: got {got} expected {expected}")


def setup(config: Config, device_type: str, *, compile_baselines: bool = True, seed: int = 0) -> Workload:
    """The shared setup factory: score copies, backends and baselines for one config."""
    del compile_baselines  # no compiled baseline for the threshold
    scope, dtype = config.params["scope"], getattr(torch, config.dtype)
    shapes = score_shapes(config.params["model"], config.params["sizes"])
    generator = torch.Generator(device=device_type).manual_seed(seed)
    bytes_per_copy = config.params["score_count"] * dtype.itemsize
    copies = [[hydra_scaled_scores(shape, dtype, device_type, generator) for shape in shapes]
              for _ in range(input_copy_count(device_type, bytes_per_copy, config.params["sizes"]))]

    def backend_run(backend):
        def run(scores):
            with ops.use_backend(backend):
                return ops.topk_threshold(scores, DENSITY, scope)
        return run

    baselines = {"release": release_kthvalue, "topk": topk_kth_smallest, "hydra_sort": hydra_sort}
    candidates = [Candidate(name, "baseline", _per_scope(baselines[name], scope)) for name in BASELINES[scope]]
    candidates += backend_candidates(OP_NAME, device_type, backend_run)
    return Workload(config, copies, candidates, list(BASELINES[scope]), compare_exact,
                    bytes_moved=bytes_per_copy, notes={"bytes_moved": "one read of every score"})
