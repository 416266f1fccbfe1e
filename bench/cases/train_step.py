"""Case `train_step`: one stage-1 (mask search) training step, in images/s.

A step is: prompt + normalize, forward through the masked model, cross-entropy on the label-mapped
logits, backward, Adam on the scores and on the prompt (docs/method.md §5: lr 1e-4, wd 1e-4; weights and
BN affine frozen, BN running statistics updating), and the global threshold (density 0.1)
recomputed from the updated scores. Implementations, each with its own copy of the same model:
* ``vpns_fast`` - the library path: ``PadPrompt`` + ``sparsify``'d model in a ``PromptedNetwork``,
  ``prepare_mask_search`` / ``parameter_groups`` for the optimizers, ``set_density`` after the
  step; every op dispatched to the backend chosen automatically on this device; the first
  convolution's input gradient computed on the prompt's frame only (``PromptedNetwork``'s default);
* ``vpns_fast_whole_input_grad`` - the same with the whole input gradient (``narrow_input_grad=False``).
Baselines:
* ``release`` - the release code's step written in eager torch: ``F.pad + program * mask + clamp
  + normalize`` (bench/cases/prompt.py), layers masking their weight with the plain autograd STE
  (bench/cases/masked.py), and the threshold recomputed TWICE per step, each time by clone, abs,
  cat and ``torch.kthvalue`` (bench/cases/threshold.py), as the release code does;
* ``dense`` - a plain dense fine-tuning step of the same model: normalize-only input, SGD
  (lr 0.01, momentum 0.9, wd 1e-4) on every parameter, no masks, no prompt, no threshold.
Every implementation in a measurement point runs under the same precision (``dtype`` float32:
no autocast; bfloat16: ``torch.autocast`` bf16, loss in float32) and memory format
(``params.channels_last``); the true release step is the float32, NCHW point's ``release`` row.

Verification happens in ``setup``: from the same initial state, one forward + backward of
``release`` and ``vpns_fast`` on the same batch must give the same loss and the same score and
program gradients (relative L2 error), and the same initial threshold (exactly). A step changes
the state, so the runner's later per-call check only asks for a finite loss.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from bench.cases.common import Candidate, Config, VerificationError, Workload
from bench.cases.masked import release_masked_weight
from bench.cases.prompt import eager_pad_prompt, release_frame_mask
from bench.cases.threshold import release_kthvalue
from bench.registry import TRAIN_STEP_POINTS, TRAIN_STEP_TARGET_CLASSES, train_step_pad
from bench.timing import input_copy_count
from vpns_fast import ops
from vpns_fast.models import build_model, source_num_classes
from vpns_fast.nn.label_mapping import LabelMapping
from vpns_fast.nn.masked_layers import initial_scores
from vpns_fast.nn.prompted_network import PromptedNetwork
from vpns_fast.nn.prompts import PadPrompt
from vpns_fast.pruning.masking import parameter_groups, prepare_mask_search, set_density, sparsify

NAME = "train_step"
OP_NAME = "training step (prompt_normalize + masked_conv2d/linear + topk_threshold)"
MODES = ("full",)
DENSITY = 0.1
CHANNELS = 3
# docs/method.md §5: stage-1 Adam for scores and prompt; the dense fine-tuning step uses stage 2's SGD.
ADAM = {"lr": 1e-4, "weight_decay": 1e-4}
SGD = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}
SUPPORTED_DTYPES = ("float32", "bfloat16")  # the autocast precision; images and parameters are float32
DEFAULT_DTYPES = {"cpu": ("float32",), "cuda": ("float32", "bfloat16")}
# (autocast dtype, channels_last) per device: bf16 + channels_last is the largest training lever.
VARIANTS = {"cuda": (("float32", False), ("bfloat16", False), ("bfloat16", True)),
            "cpu": (("float32", False), ("bfloat16", False))}
BASELINES = ["release", "dense"]
BASELINE_NAMES = tuple(BASELINES)
# vpns_fast_whole_input_grad: the library step with the first convolution's whole input gradient
# (PromptedNetwork(narrow_input_grad=False)), to show what narrowing it to the prompt's region gives.
EXTRA_IMPLS = ("vpns_fast", "vpns_fast_whole_input_grad")
# Relative L2 error of the loss and of the score / program gradients, release vs vpns_fast.
GRADIENT_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}
DESCRIPTION = ("one stage-1 step (prompt, masked forward/backward, Adam on scores + prompt, global threshold) "
               "in images/s; impl vpns_fast (library path); baselines: release (eager, kthvalue twice per "
               "step), dense (plain fine-tuning step, SGD)")


def configs(device_type: str, sizes: str, dtypes: list[str] | None = None) -> list[Config]:
    chosen = [d for d in (dtypes or DEFAULT_DTYPES[device_type]) if d in SUPPORTED_DTYPES]
    model_name, image_size, batches = TRAIN_STEP_POINTS[(device_type, sizes)]
    pad = train_step_pad(image_size)
    points = []
    for batch in batches:
        for dtype, channels_last in VARIANTS[device_type]:
            if dtype not in chosen or (sizes == "small" and dtype == "bfloat16" and not channels_last
                                       and device_type == "cuda"):
                continue
            layout = "channels_last" if channels_last else "NCHW"
            points.append(Config(NAME, f"{model_name} B={batch} {image_size}px pad={pad} {layout}", dtype, "full",
                                 {"model": model_name, "batch": batch, "image_size": image_size, "pad": pad,
                                  "amp": "none" if dtype == "float32" else "bf16", "channels_last": channels_last,
                                  "density": DENSITY, "granularity": "unstructured", "sizes": sizes,
                                  "target_classes": TRAIN_STEP_TARGET_CLASSES, "images_dtype": "float32"}))
    return points


# ---------------------------------------------------------------- the release step

class ReleaseMaskedConv2d(nn.Conv2d):
    """A Conv2d masking its weight as the release code does (``scores``, ``threshold`` attached)."""

    def forward(self, x):
        return self._conv_forward(x, release_masked_weight(self.weight, self.scores, self.threshold), self.bias)


class ReleaseMaskedLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, release_masked_weight(self.weight, self.scores, self.threshold), self.bias)


def release_sparsify(model: nn.Module) -> list[nn.Module]:
    """Turn every Conv2d/Linear into its release-style masked version in place (HYDRA scaled
    score init, as ``vpns_fast.sparsify`` does); returns the masked layers in module order."""
    layers = []
    for module in model.modules():
        if type(module) in (nn.Conv2d, nn.Linear):
            module.__class__ = ReleaseMaskedConv2d if isinstance(module, nn.Conv2d) else ReleaseMaskedLinear
            module.scores = nn.Parameter(initial_scores(module.weight, "unstructured", "scaled"))
            module.threshold = None
            layers.append(module)
    return layers


class _Step:
    """One implementation's state; ``forward_backward`` then ``finish`` is one training step."""

    def step(self, inputs):
        images, labels = inputs
        loss = self.forward_backward(images, labels)
        self.finish()
        return loss

    def forward_backward(self, images, labels):
        with self.autocast():
            logits = self.logits(images)
            loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        return loss.detach()

    def finish(self):
        for optimizer in self.optimizers:
            optimizer.step()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.after_step()

    def after_step(self):
        pass


def _autocast_factory(device_type, dtype_name):
    if dtype_name == "float32":
        return lambda: torch.autocast(device_type, enabled=False)
    return lambda: torch.autocast(device_type, dtype=getattr(torch, dtype_name))


class ReleaseStep(_Step):
    def __init__(self, dense, p, device_type, autocast):
        self.model = copy.deepcopy(dense)
        self.layers = release_sparsify(self.model)
        self.model.to(device_type)
        if p["channels_last"]:
            self.model.to(memory_format=torch.channels_last)
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.scores = [layer.scores for layer in self.layers]
        for scores in self.scores:
            scores.requires_grad_(True)
        size, pad = p["image_size"], p["pad"]
        self.program = nn.Parameter(torch.zeros(CHANNELS, size, size, device=device_type))
        self.frame_mask = release_frame_mask(size, pad, device_type)
        self.mean = torch.tensor(ops.IMAGENET_MEAN, device=device_type)[:, None, None]
        self.std = torch.tensor(ops.IMAGENET_STD, device=device_type)[:, None, None]
        self.mapping = torch.arange(TRAIN_STEP_TARGET_CLASSES, device=device_type)
        self.k = ops.kth_index(DENSITY, sum(s.numel() for s in self.scores))
        self.channels_last, self.autocast = p["channels_last"], autocast
        self.optimizers = [torch.optim.Adam(self.scores, **ADAM), torch.optim.Adam([self.program], **ADAM)]
        self.update_threshold()
        self.model.train()

    def update_threshold(self):
        threshold = release_kthvalue([s.detach() for s in self.scores], self.k)
        for layer in self.layers:
            layer.threshold = threshold
        return threshold

    def logits(self, images):
        self.update_threshold()  # the release computes it in the step as well as after it
        x = eager_pad_prompt(images, self.program, self.frame_mask, self.mean, self.std, 0, 0)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)[:, self.mapping]

    def after_step(self):
        self.update_threshold()

    def gradients(self):
        return [s.grad for s in self.scores] + [self.program.grad]


class LibraryStep(_Step):
    def __init__(self, dense, p, device_type, autocast, narrow_input_grad=True):
        model = sparsify(copy.deepcopy(dense), "unstructured", "scaled")
        model.to(device_type)
        if p["channels_last"]:
            model.to(memory_format=torch.channels_last)
        size = p["image_size"]
        self.prompt = PadPrompt(out_size=size, in_size=size, pad=p["pad"]).to(device_type)
        mapping = LabelMapping(TRAIN_STEP_TARGET_CLASSES, "flm", source_num_classes(model))
        self.network = PromptedNetwork(model, self.prompt, mapping, self.prompt.mean, self.prompt.std,
                                       p["channels_last"], narrow_input_grad).to(device_type)
        self.model = model
        prepare_mask_search(model)
        self.scores = parameter_groups(model)["scores"]
        self.optimizers = [torch.optim.Adam(self.scores, **ADAM), torch.optim.Adam([self.prompt.program], **ADAM)]
        self.autocast = autocast
        self.threshold = set_density(model, DENSITY, "global")
        self.network.train()

    def logits(self, images):
        return self.network(images, True)

    def after_step(self):
        self.threshold = set_density(self.model, DENSITY, "global")

    def gradients(self):
        return [s.grad for s in self.scores] + [self.prompt.program.grad]


class DenseStep(_Step):
    def __init__(self, dense, p, device_type, autocast):
        self.model = copy.deepcopy(dense).to(device_type)
        if p["channels_last"]:
            self.model.to(memory_format=torch.channels_last)
        self.mean = torch.tensor(ops.IMAGENET_MEAN, device=device_type)[:, None, None]
        self.std = torch.tensor(ops.IMAGENET_STD, device=device_type)[:, None, None]
        self.mapping = torch.arange(TRAIN_STEP_TARGET_CLASSES, device=device_type)
        self.channels_last, self.autocast = p["channels_last"], autocast
        self.optimizers = [torch.optim.SGD(self.model.parameters(), **SGD)]
        self.model.train()

    def logits(self, images):
        x = (images - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)[:, self.mapping]


# ---------------------------------------------------------------- verification

def _relative_error(got, expected) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30)).item()


def verify_release_equivalence(release: ReleaseStep, library: LibraryStep, inputs, dtype_name):
    """Same initial threshold; same loss and gradients after one forward + backward from the same
    state. Leaves both without gradients (BN running statistics have moved by one batch)."""
    tolerance = GRADIENT_TOLERANCE[dtype_name]
    release_threshold = release.update_threshold()
    if not torch.equal(release_threshold.to(library.threshold.dtype), library.threshold):
        raise VerificationError(f"train_step: initial thresholds differ: release {release_threshold.item()!r}, "
                                f"vpns_fast {library.threshold.item()!r}")
    images, labels = inputs
    expected_loss = release.forward_backward(images, labels)
    loss = library.forward_backward(images, labels)
    problems = []
    if _relative_error(loss, expected_loss) > tolerance:
        problems.append(f"loss {loss.item():.6g} vs release {expected_loss.item():.6g}")
    expected_grads, grads = release.gradients(), library.gradients()
    names = [f"scores[{i}]" for i in range(len(expected_grads) - 1)] + ["program"]
    for name, got, expected in zip(names, grads, expected_grads):
        if got is None or expected is None or got.shape != expected.shape:
            problems.append(f"{name} gradient missing or misshapen")
        elif _relative_error(got, expected) > tolerance:
            problems.append(f"{name} gradient relative L2 error {_relative_error(got, expected):.3g}")
    for step in (release, library):
        for optimizer in step.optimizers:
            optimizer.zero_grad(set_to_none=True)
    if problems:
        raise VerificationError(f"train_step: vpns_fast differs from the release step (tolerance {tolerance}): "
                                + "; ".join(problems[:5]))


def compare_finite_loss(output, reference, impl_name):
    """The per-call check of the runner: the step ran and returned a finite scalar loss (the
    equivalence with the release step was checked in ``setup``, from a common state)."""
    if not isinstance(output, torch.Tensor) or output.dim() != 0 or not bool(torch.isfinite(output)):
        raise VerificationError(f"train_step: {impl_name} returned {output!r}, expected a finite scalar loss")


# ---------------------------------------------------------------- setup

def setup(config: Config, device_type: str, *, compile_baselines: bool = True, seed: int = 0) -> Workload:
    """The shared setup factory: one model, copied into each implementation, and image batches."""
    del compile_baselines  # no compiled step: torch.compile of a whole step is not a release baseline
    p = config.params
    batch, size = p["batch"], p["image_size"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dense = build_model(p["model"])
    autocast = _autocast_factory(device_type, config.dtype)
    generator = torch.Generator(device=device_type).manual_seed(seed)

    def random_batch():
        images = torch.rand(batch, CHANNELS, size, size, generator=generator, device=device_type)
        labels = torch.randint(0, TRAIN_STEP_TARGET_CLASSES, (batch,), generator=generator, device=device_type)
        return images, labels

    bytes_per_copy = batch * CHANNELS * size * size * 4
    copies = [random_batch() for _ in range(input_copy_count(device_type, bytes_per_copy, p["sizes"]))]

    release = ReleaseStep(dense, p, device_type, autocast)
    candidates = [Candidate("release", "baseline", release.step),
                  Candidate("dense", "baseline", DenseStep(dense, p, device_type, autocast).step)]
    try:
        library = LibraryStep(dense, p, device_type, autocast)
        verify_release_equivalence(release, library, copies[0], config.dtype)
    except VerificationError:
        raise
    except Exception as exc:  # a backend that crashes: the runner records it as this impl's error
        message = f"{type(exc).__name__}: {exc}"

        def failing_step(_inputs, message=message):
            raise RuntimeError(f"vpns_fast failed in setup: {message}")
        candidates.append(Candidate("vpns_fast", "backend", failing_step))
    else:
        candidates.append(Candidate("vpns_fast", "backend", library.step))
        whole = LibraryStep(dense, p, device_type, autocast, narrow_input_grad=False)
        candidates.append(Candidate("vpns_fast_whole_input_grad", "backend", whole.step))
    return Workload(config, copies, candidates, list(BASELINES), compare_finite_loss, bytes_moved=None,
                    images_per_call=batch,
                    notes={"verification": "release vs vpns_fast loss and gradients from one common state, in setup"})

