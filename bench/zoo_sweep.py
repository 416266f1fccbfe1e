"""Every torchvision classification model through ``deploy()``: outputs against the pruned model's, as a user
bringing any of them would check.

    .venv/bin/python -m bench.zoo_sweep [--models resnet18,swin_t] [--density 0.1] [--threads 1] > report.txt

Each model (random init, seed 0; those above --max-params skipped, the list says which) is made to depend on its
input the way a trained one does: all-zero weights (ViT's head) are drawn again, every Conv2d / Linear weight (and
attention input projection) pruned by magnitude to ``--density``, the kept weights scaled by density^-1/2 (so
activations keep their size) and the BatchNorm statistics taken from 4 random images. Without that, ShuffleNet,
GoogLeNet and ViT returned their bias whatever the image, and any engine would pass. Then ``deploy(model,
example_input_size=(2, 3, S, S), policy="sparse")`` (S: 64, or the size the model requires) and, on [0, 1] images at
batch 1 and 3 inside ``torch.inference_mode()``, the deployed output's largest difference from the model's on the
normalized images, relative to the model's largest output. The model's own float32 rounding on the same images
(``sparse_cpu.float32_rounding``: its float32 outputs, NCHW and channels_last, against a float64 copy's, the same
measure) is reported next to it: a model that amplifies rounding is no engine error. Status: ``ok`` (within 1e-4,
or within 4 times the model's own rounding, as deploy's end-to-end check), ``refused`` (deploy raised: right or
refused) or ``WRONG``; the exit status is 1 when any is ``WRONG``. Each shape is called twice, the second call
through the compiled call plan the first made (vpns_fast.deploy.call_plan): both are checked, the second must equal
the first bit for bit, and the "call plan" column gives the plan's step count (its smaller one over the two shapes) or
"none" with the reason.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
import warnings

import torch
from torch import nn

# Sizes the models require (their own positional embeddings or pooling); 64 for the others.
FIXED_SIZES = {"inception_v3": 299}  # its auxiliary head, which runs while the BatchNorm statistics are taken
FIXED_SIZE_PREFIXES = ("vit_", "swin_", "maxvit_")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parameter_count(name: str) -> int:
    """The model's size from torchvision's weights metadata (no model built); 0 when it has none."""
    import torchvision

    try:
        return int(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"])
    except (KeyError, ValueError, AttributeError):
        return 0


def image_size(name: str) -> int:
    return 224 if name.startswith(FIXED_SIZE_PREFIXES) else FIXED_SIZES.get(name, 64)


def conditioned(model: nn.Module, density: float, size: int) -> nn.Module:
    """``model`` pruned to ``density`` and scaled so that its output depends on its input (see the module doc)."""
    from vpns_fast.nn.prompts import normalize

    with torch.no_grad():
        weights = []
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                if not module.weight.any():
                    nn.init.kaiming_normal_(module.weight)
                weights.append(module.weight)
            if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
                weights.append(module.in_proj_weight)
        for weight in weights:
            kept = max(1, round(density * weight.numel()))
            cut = weight.abs().flatten().kthvalue(weight.numel() - kept + 1).values
            weight.mul_((weight.abs() >= cut).to(weight.dtype) * density ** -0.5)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average over the calibration batch
        if norms:
            model.train()
            model(normalize(torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(99)), MEAN, STD))
    return model.eval()


def relative_difference(output: torch.Tensor, reference: torch.Tensor) -> float:
    """max |output - reference| / max |reference| (inf when NaN or infinities sit in other places)."""
    finite = torch.isfinite(reference)
    if not torch.equal(torch.isfinite(output), finite):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = float(reference[finite].abs().max())
    return float((output[finite].double() - reference[finite].double()).abs().max()) / max(scale, 1e-30)


def check(name: str, density: float) -> dict:
    import torchvision

    import vpns_fast
    from vpns_fast.deploy.sparse_cpu import float32_rounding
    from vpns_fast.nn.prompts import normalize

    size = image_size(name)
    row = {"model": name, "size": size, "error": None, "rounding": None, "status": "ok", "why": ""}
    torch.manual_seed(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = conditioned(torchvision.models.get_model(name).eval(), density, size)
    except Exception as exc:  # the sweep's own preparation failed: no verdict on the engine
        return {**row, "status": "not run", "why": f"preparing the model: {type(exc).__name__}: {str(exc)[:120]}"}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = vpns_fast.deploy(model, example_input_size=(2, 3, size, size), policy="sparse")
    except Exception as exc:  # refused: the engine declined the model, which is right or refused
        return {**row, "status": "refused", "why": f"{type(exc).__name__}: {str(exc)[:160]}"}
    row["deploy_s"] = time.perf_counter() - start
    generator = torch.Generator().manual_seed(1)
    errors, roundings, planned_apart = [], [], []
    for batch in (1, 3):
        images = torch.rand(batch, 3, size, size, generator=generator)
        with torch.inference_mode():
            reference = model(normalize(images, MEAN, STD))
            first = engine(images)  # the call that makes the compiled call plan for this shape
            planned = engine(images)  # through it, where one was made
            errors.append((relative_difference(first, reference), relative_difference(planned, reference)))
            planned_apart.append(not torch.equal(first, planned))
        rounding = float32_rounding(model, normalize(images, MEAN, STD), reference)
        roundings.append(rounding[0] / max(float(reference.abs().max()), 1e-30) if rounding else float("nan"))
    row["error"], row["rounding"] = max(e for pair in errors for e in pair), max(roundings)
    plans = engine.call_plans()
    row["plan"] = (f"{min(p['steps'] for p in plans)} steps" if plans and all(p["steps"] for p in plans)
                   else "no plan: " + next((p["refused"] for p in plans if p["refused"]), "none made"))
    if not all(e <= max(1e-4, 4 * r) for pair, r in zip(errors, roundings) for e in pair):  # NaN fails too
        row["status"] = "WRONG"
    elif any(planned_apart):
        row.update(status="WRONG", why="the call through its plan differed from the call that made it")
    return row


def main(argv=None) -> int:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated names (default: every classification model)")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-params", type=float, default=150e6, help="skip larger models (default 150e6)")
    args = parser.parse_args(argv)
    known = torchvision.models.list_models(module=torchvision.models)
    names = args.models.split(",") if args.models else known
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"--models: expected torchvision classification models, got {', '.join(unknown)}")
    if not 0 < args.density <= 1:
        parser.error(f"--density: expected a fraction in (0, 1], got {args.density}")
    if args.threads < 1:
        parser.error(f"--threads: expected an integer >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# deploy() on torchvision models, {args.density} kept, {args.threads} threads; torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, python {platform.python_version()}; {now}")
    print(f"{'model':<22} {'px':>4} {'error':>9} {'rounding':>9} {'deploy s':>8}  {'call plan':<11} status")
    wrong = 0
    for name in names:
        parameters = parameter_count(name)
        if parameters > args.max_params:
            print(f"{name:<22} skipped: {parameters / 1e6:.0f}M parameters", flush=True)
            continue
        row = check(name, args.density)
        wrong += row["status"] == "WRONG"
        error = f"{row['error']:9.1e}" if row["error"] is not None else f"{'-':>9}"
        rounding = f"{row['rounding']:9.1e}" if row["rounding"] is not None else f"{'-':>9}"
        plan = row.get("plan", "-")
        print(f"{name:<22} {row['size']:4d} {error} {rounding} {row.get('deploy_s', 0):8.1f}  "
              f"{plan if len(plan) <= 11 else 'none':<11} {row['status']}{'  ' + row['why'] if row['why'] else ''}"
              f"{'  (' + plan + ')' if len(plan) > 11 else ''}", flush=True)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
