"""Presenting a run: the final table and the plots (accuracy vs sparsity, training curves,
the learned prompt)."""
from __future__ import annotations

import os

import torch


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


def write_plots(out_dir: str, runs: list[dict], prompt_checkpoint: str | None = None) -> list[str]:
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
        if method == "dense":
            ax.axhline(ys[0], color="gray", linestyle="--", label="dense")
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

    prompt_path = prompt_checkpoint or _first_prompt_checkpoint(out_dir, runs)
    if prompt_path is not None:
        written.append(plot_prompt(prompt_path, os.path.join(folder, "prompt.png")))
    return written


def _first_prompt_checkpoint(out_dir: str, runs: list[dict]) -> str | None:
    for r in sorted(runs, key=lambda r: r["density"]):
        path = os.path.join(out_dir, "runs", f"{r['method']}_d{r['density']:g}", "best.pt")
        if r["test_acc_prompt"] is not None and os.path.exists(path):
            return path
    return None


def plot_prompt(checkpoint_path: str, out_path: str) -> str:
    """The learned prompt as an image: what it adds in its region, shown in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vpns_fast.checkpoint import load_checkpoint, prompt_from_spec

    payload = load_checkpoint(checkpoint_path)
    if payload["prompt"] is None:
        raise ValueError(f"{checkpoint_path} holds no prompt")
    prompt = prompt_from_spec(payload["prompt"])
    program = prompt.program.detach()
    region = prompt.region()
    if prompt.kind == "pad":
        # the pad program is added as is and stays small: show it around mid-gray, scaled to its range
        peak = float((program * region).abs().max()) or 1.0
        shown = (0.5 + 0.5 * program / peak) * region
        scale = f", shown at +-{peak:.3g}"
    else:
        shown = torch.sigmoid(program) * region
        scale = ""
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(shown.clamp(0, 1).permute(1, 2, 0).numpy())
    ax.set_title(f"{prompt.kind} prompt ({prompt.num_learnable():,} learnable values{scale})", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
