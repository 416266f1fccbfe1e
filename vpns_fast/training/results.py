"""A run's results row, and presenting a job's runs: the final table and the plots (accuracy vs
sparsity, training curves, the learned prompt)."""
from __future__ import annotations

import os
import warnings

import torch

from vpns_fast.errors import first_items
from vpns_fast.nn.prompted_network import PromptedNetwork
from vpns_fast.nn.prompts import VisualPrompt
from vpns_fast.pruning.masking import IdleLayerWarning, actual_density, density_report
from vpns_fast.pruning.methods import get_method
from vpns_fast.training.config import TrainConfig
from vpns_fast.training.run_files import run_dir
from vpns_fast.training.state import RunState


def selection_key(network: PromptedNetwork, protocol: str) -> str:
    """The validation accuracy that selects a run's epoch: with the prompt under protocol "prompted"."""
    return "val_acc_prompt" if network.prompt is not None and protocol == "prompted" else "val_acc"


def result_row(config: TrainConfig, method: str, density: float, network: PromptedNetwork, state: RunState,
               epochs: dict[str, int], wall: float) -> dict:
    """One row of ``results.json``; ``state.best`` is the selected epoch's record."""
    model = network.model
    size = config.network_input_size()
    report = density_report(model, (3, size, size))
    best = state.best or {}
    last = state.history[-1] if state.history else {}
    selected_by = selection_key(network, config.protocol)
    if best and selected_by not in best:  # no val split: the last epoch was selected
        selected_by = "last_epoch"
    emptied = [row.name for row in report.rows if row.masked and row.params and row.kept == 0]
    if emptied:
        # a global threshold can keep nothing of a layer: OMP at 30% kept emptied MobileNetV3's classifier, whose
        # every prediction was then the same (an outside review); the run is what it is, but it must say so
        warnings.warn(f"{method} at density {density:g}: {len(emptied)} layer(s) kept no weight "
                      f"({first_items(emptied)}), so the network's output no "
                      "longer depends on its input through them (a threshold shared by all layers did that; "
                      "VPNs' --scope layer keeps some weights of every layer)", IdleLayerWarning, stacklevel=2)
    unused = report.unused_layers
    if unused:
        warnings.warn(f"{method} at density {density:g}: {len(unused)} masked layer(s) did no work in the eval-mode "
                      f"forward ({first_items(unused)}); their weights count in "
                      "the density and the global threshold, so the layers that run keep more than it says: "
                      "delete them from the model before the run", IdleLayerWarning, stacklevel=2)
    return {
        "method": method, "density": density, "actual_density": actual_density(model),
        "test_acc": best.get("test_acc"), "test_acc_prompt": best.get("test_acc_prompt"),
        "val_acc": best.get("val_acc"), "val_acc_prompt": best.get("val_acc_prompt"),
        "selected_epoch": best.get("epoch"), "selected_by": selected_by,
        # every accuracy comes as a pair: without the prompt, and `_prompt` with it (None when
        # the method has none); which one is the headline depends on the protocol
        "last_test_acc": last.get("test_acc"), "last_test_acc_prompt": last.get("test_acc_prompt"),
        "protocol": config.protocol,
        # --limit: every split capped at this many images; accuracies are not comparable with
        # full-data runs, so each row says so (None: the whole dataset)
        "limit": config.limit,
        "params_kept": report.kept, "params_total": report.params, "emptied_layers": emptied,
        "unused_layers": unused,
        "flops_kept": report.kept_flops, "flops_dense": report.dense_flops,
        "epochs": epochs,
        "wall_s": wall, "train_s": state.train_seconds,
        "images_per_s": state.images / max(state.train_seconds, 1e-9),
        "history": state.history,
    }


def headline_acc(run: dict, last: bool = False) -> float | None:
    """The accuracy a run is judged by: with the prompt under protocol "prompted" (when the run
    has a prompt), without it under "release"."""
    prefix = "last_test_acc" if last else "test_acc"
    if run.get("protocol") == "prompted" and run.get(f"{prefix}_prompt") is not None:
        return run[f"{prefix}_prompt"]
    return run[prefix]


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def results_table(runs: list[dict]) -> str:
    header = ["method", "density", "actual", "test acc", "+prompt", "val acc", "sel. ep", "last acc",
              "params kept", "GFLOPs kept", "img/s", "wall s"]
    rows = []
    for r in runs:
        rows.append([r["method"], f"{r['density']:g}", f"{r['actual_density']:.4f}", _pct(r["test_acc"]),
                     _pct(r["test_acc_prompt"]), _pct(r.get("val_acc")), str(r["selected_epoch"]),
                     _pct(headline_acc(r, last=True)), f"{r['params_kept']:,}",
                     "-" if r["flops_kept"] is None else f"{r['flops_kept'] / 1e9:.3f}",
                     f"{r['images_per_s']:.0f}", f"{r['wall_s']:.1f}"])
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [fmt(header), "-" * len(fmt(header)), *map(fmt, rows)]
    limits = sorted({r["limit"] for r in runs if r.get("limit") is not None})
    if limits:
        lines.append(f"(--limit: every split capped at {', '.join(map(str, limits))} images; not comparable "
                     f"with full-data results)")
    return "\n".join(lines)


def write_plots(out_dir: str, runs: list[dict]) -> list[str]:
    """Writes ``plots/accuracy_vs_sparsity.png``, ``plots/curves.png`` and, when a run kept a
    prompt, ``plots/prompt.png``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = os.path.join(out_dir, "plots")
    os.makedirs(folder, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in runs):
        points = sorted((100 * (1 - r["actual_density"]), headline_acc(r)) for r in runs
                        if r["method"] == method and headline_acc(r) is not None)
        if not points:
            continue
        xs, ys = zip(*points)
        if get_method(method).mask == "dense":  # one unpruned run: a reference line
            ax.axhline(ys[0], color="gray", linestyle="--", label=method)
        else:
            ax.plot(xs, ys, marker="o", label=method)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs sparsity")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no run with a test accuracy: no legend (and no warning)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(folder, "accuracy_vs_sparsity.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        accs = [h.get("val_acc") for h in r["history"]]
        if any(a is not None for a in accs):
            ax.plot(range(1, len(accs) + 1), accs, label=f"{r['method']} d={r['density']:g}")
    ax.set_xlabel("epoch (all phases)")
    ax.set_ylabel("val accuracy (%)")
    ax.set_title("training curves")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no val split: no curves
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = os.path.join(folder, "curves.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    prompt_path = _first_prompt_checkpoint(out_dir, runs)
    if prompt_path is not None:
        written.append(plot_prompt(prompt_path, os.path.join(folder, "prompt.png")))
    return written


def _first_prompt_checkpoint(out_dir: str, runs: list[dict]) -> str | None:
    for r in sorted(runs, key=lambda r: r["density"]):
        path = os.path.join(run_dir(out_dir, r["method"], r["density"]), "best.pt")
        if r["test_acc_prompt"] is not None and os.path.exists(path):
            return path
    return None


def prompt_picture(prompt: VisualPrompt) -> tuple[torch.Tensor, float | None]:
    """What the prompt adds in its region as a (3, H, W) CPU image in [0, 1] (plots/prompt.png, TensorBoard,
    wandb), and for a pad prompt the magnitude shown at black and white (else None)."""
    program = prompt.program.detach().float().cpu()
    region = prompt.region().cpu()
    if prompt.kind == "pad":
        # the pad program is added as is and stays small: show it around mid-gray, scaled to its range
        peak = float((program * region).abs().max()) or 1.0
        return ((0.5 + 0.5 * program / peak) * region).clamp(0, 1), peak
    return (torch.sigmoid(program) * region).clamp(0, 1), None


def plot_prompt(checkpoint_path: str, out_path: str) -> str:
    """The learned prompt as an image: what it adds in its region, shown in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vpns_fast.pruning.checkpoint import load_checkpoint, prompt_from_spec

    payload = load_checkpoint(checkpoint_path)
    if payload["prompt"] is None:
        raise ValueError(f"{checkpoint_path} holds no prompt")
    prompt = prompt_from_spec(payload["prompt"])
    shown, peak = prompt_picture(prompt)
    scale = f", shown at +-{peak:.3g}" if peak is not None else ""
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(shown.permute(1, 2, 0).numpy())
    ax.set_title(f"{prompt.kind} prompt ({prompt.num_learnable():,} learnable values{scale})", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
