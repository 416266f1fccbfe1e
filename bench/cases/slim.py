"""Case `slim`: inference of a channel-slimmed ResNet against the same network unslimmed.

The GPU target: a ResNet-18 with 50% of its channels pruned, slimmed (pruned channels removed,
BatchNorm folded; ``vpns_fast.deploy.slim``), at >= 1.6x the images/s of the dense network. This case
measures that ratio on any device.

Model: torchvision ``<model>()`` (random init, seed 0, eval), ``sparsify(granularity="channel",
structured=True)`` with its magnitude-based ``scaled`` scores and ``set_density(0.5, scope="layer")``:
every score vector (a conv's, or a residual group's shared one) keeps its top half, the first five
convs at least 75% (docs/method.md §9), so ``params.channel_density`` is >= 0.5 and every layer is about half
as wide. (One global threshold would not give that here: at random init the ``scaled`` score is
about ``sqrt(6 / fan_in)`` for every channel of a layer, so it would rank whole layers by fan-in and
empty the widest ones.) Every pruned channel is then removable (structured mode), as with trained
structured masks; ``params.widths`` lists each conv's ``[dense, slim]`` output channels.

Implementations, on the network only (the prompt and normalization are the same for both):
* ``slim`` (backend) - ``slim_model(fold(model))``: what ``vpns_fast.deploy(..., device="cuda")``
  runs for structured masks;
Baselines (the first is the reference):
* ``dense`` - ``fold(model)``: the full-width network with the pruned channels' weights zero, BN
  kept (``deploy(..., slim=False)`` on CUDA);
* ``compiled`` - ``torch.compile`` of ``dense`` (default mode): the dense network at its best.
On CUDA both run channels_last (as ``deploy`` does), in float32 (cuDNN's TF32 setting as it is) or
bfloat16 (weights and input cast). ``params`` records the parameter counts and the channel density.

Check before timing: ``|slim - dense| <= tol * (1 + max |dense|)`` with tol 1e-4 for float32 on the
CPU, 2e-2 for CUDA float32 (TF32 convolutions) and 1e-1 for bfloat16: a sanity check only (the
exactness of slimming is tested in float64 in tests/test_slim_vgg.py and tests/test_structured.py).
"""
from __future__ import annotations

import copy
import functools

import torch

from bench.cases.common import Candidate, Config, VerificationError, Workload, compiled_candidate, no_grad
from bench.timing import input_copy_count

NAME = "slim"
OP_NAME = "channel-slimmed inference (vpns_fast.deploy.slim)"
SUPPORTED_DTYPES = ("float32", "bfloat16")
DEFAULT_DTYPES = {"cpu": ("float32",), "cuda": ("float32", "bfloat16")}
CHANNEL_DENSITY = 0.5
# (models, image size, batches) per (device, sizes)
POINTS = {("cuda", "full"): (("resnet18", "resnet50"), 224, (1, 32, 256)),
          ("cpu", "full"): (("resnet18", "resnet50"), 224, (1, 32)),
          ("cuda", "small"): (("resnet18",), 64, (2,)),
          ("cpu", "small"): (("resnet18",), 64, (2,))}
TOLERANCE = {("cpu", "float32"): 1e-4, ("cuda", "float32"): 2e-2, ("cpu", "bfloat16"): 1e-1,
             ("cuda", "bfloat16"): 1e-1}
BASELINES = ["dense", "compiled"]
BASELINE_NAMES = tuple(BASELINES)
EXTRA_IMPLS = ("slim",)
DESCRIPTION = ("inference of a ResNet with 50% of its channels pruned (structured mode): slim network "
               "(channels removed, BN folded) vs the dense folded network and its torch.compile")


def configs(device_type: str, sizes: str, dtypes: list[str] | None = None) -> list[Config]:
    chosen = [d for d in (dtypes or DEFAULT_DTYPES[device_type]) if d in SUPPORTED_DTYPES]
    models, image_size, batches = POINTS[(device_type, sizes)]
    return [Config(NAME, f"{model} B={batch} {image_size}px channel_density={CHANNEL_DENSITY}", dtype, "fwd",
                   {"model": model, "batch": batch, "image_size": image_size, "sizes": sizes,
                    "target_channel_density": CHANNEL_DENSITY, "channels_last": device_type == "cuda"})
            for model in models for batch in batches for dtype in chosen]


@functools.lru_cache(maxsize=1)  # configs come grouped by model: one pair of networks alive
def slim_and_dense(model_name: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(slim network, dense folded network, facts) on the CPU in float32."""
    import torchvision

    import vpns_fast as V
    from vpns_fast.deploy.slim import slim_model
    from vpns_fast.pruning.structured import channel_density

    torch.manual_seed(seed)
    model = getattr(torchvision.models, model_name)().eval()
    V.sparsify(model, "channel", structured=True)
    V.set_density(model, CHANNEL_DENSITY, scope="layer")
    dense = V.fold(model).eval()
    slim, architecture, report = slim_model(dense)
    convs = architecture["convs"]  # {name: [in, out]} of the slim network
    facts = {"channel_density": channel_density(model),
             "dense_parameters": sum(p.numel() for p in dense.parameters()),
             "slim_parameters": sum(p.numel() for p in slim.parameters()),
             "channels_dropped": sum(report[name]["dropped"] for name in convs),
             "widths": {name: [report[name]["channels"], out] for name, (_, out) in convs.items()}}
    return slim.eval(), dense, facts


def _prepared(network: torch.nn.Module, device_type: str, dtype: torch.dtype, channels_last: bool):
    network = copy.deepcopy(network).to(device_type, dtype)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    for p in network.parameters():
        p.requires_grad_(False)
    return network.eval()


def setup(config: Config, device_type: str, *, compile_baselines: bool = True, seed: int = 0) -> Workload:
    p = config.params
    dtype = getattr(torch, config.dtype)
    slim, dense, facts = slim_and_dense(p["model"], seed)
    p.update(facts)
    channels_last = p["channels_last"]
    slim, dense = (_prepared(net, device_type, dtype, channels_last) for net in (slim, dense))
    shape = (p["batch"], 3, p["image_size"], p["image_size"])
    generator = torch.Generator().manual_seed(seed)
    copies = input_copy_count(device_type, shape[0] * 3 * shape[2] * shape[3] * dtype.itemsize, p["sizes"])
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    inputs = [torch.randn(shape, generator=generator).to(device_type, dtype).contiguous(memory_format=memory_format)
              for _ in range(copies)]
    candidates = [Candidate("dense", "baseline", no_grad(dense)),
                  compiled_candidate(compile_baselines, dense, no_grad, inputs[0]),
                  Candidate("slim", "backend", no_grad(slim))]
    tolerance = TOLERANCE[(device_type, config.dtype)]

    def compare(output, reference, impl_name):
        if not isinstance(output, torch.Tensor) or output.shape != reference.shape:
            raise VerificationError(f"slim: {impl_name} returned {getattr(output, 'shape', type(output).__name__)}, "
                                    f"dense {tuple(reference.shape)}")
        error = float((output.float() - reference.float()).abs().max())
        scale = 1.0 + float(reference.float().abs().max())
        if not error <= tolerance * scale:
            raise VerificationError(f"slim: {impl_name} differs from dense by {error:.3g} (bound {tolerance:g} * "
                                    f"{scale:.3g}) ({config.shape}, {config.dtype})")

    return Workload(config, inputs, candidates, list(BASELINES), compare, images_per_call=p["batch"])
