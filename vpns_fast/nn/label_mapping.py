"""Label mapping from source (e.g. ImageNet) logits to target classes (docs/method.md §4).

FLM: one pass of the (prompted) network over the training set, then a greedy one-to-one assignment
of source classes to target classes by prediction frequency, fixed afterwards. ILM: the same,
recomputed at the start of every epoch (the release code's "ilm" never recomputes; ours does).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["prediction_counts", "greedy_label_mapping", "LabelMapping", "MODES"]

MODES = ("flm", "ilm", "none")


def prediction_counts(
    source_predictions: torch.Tensor, targets: torch.Tensor, num_source: int, num_target: int
) -> torch.Tensor:
    """counts[i, j] = number of samples of target class j predicted as source class i."""
    source_predictions = source_predictions.reshape(-1).long()
    targets = targets.reshape(-1).long()
    if source_predictions.numel() != targets.numel():
        raise ValueError(
            f"{source_predictions.numel()} predictions but {targets.numel()} targets"
        )
    if source_predictions.numel():
        if int(source_predictions.min()) < 0 or int(source_predictions.max()) >= num_source:
            raise ValueError(f"source predictions must lie in [0, {num_source})")
        if int(targets.min()) < 0 or int(targets.max()) >= num_target:
            raise ValueError(f"targets must lie in [0, {num_target})")
    flat = source_predictions * num_target + targets
    counts = torch.bincount(flat, minlength=num_source * num_target)
    return counts.reshape(num_source, num_target)


def greedy_label_mapping(counts: torch.Tensor) -> torch.Tensor:
    """mapping[j] = source class assigned to target class j, by repeatedly taking the largest count.

    Ties go to the first entry in row-major order (``argmax`` of the flattened matrix), as in the
    release code.
    """
    if counts.dim() != 2:
        raise ValueError(f"counts must be [num_source, num_target], got {tuple(counts.shape)}")
    num_source, num_target = counts.shape
    if num_source < num_target:
        raise ValueError(
            f"a one-to-one label mapping needs at least as many source classes as target classes "
            f"(got {num_source} source < {num_target} target)"
        )
    # float64 with -inf for removed rows/columns: removed entries can never win, even against
    # zeros or negative scores; integer counts up to 2**53 stay exact.
    remaining = counts.detach().to(device="cpu", dtype=torch.float64).clone()
    mapping = torch.empty(num_target, dtype=torch.long)
    for _ in range(num_target):
        flat_index = int(torch.argmax(remaining))
        source, target = divmod(flat_index, num_target)
        mapping[target] = source
        remaining[source, :] = float("-inf")
        remaining[:, target] = float("-inf")
    return mapping


def _to_network_input(images: torch.Tensor, prompt: Callable | None) -> torch.Tensor:
    if prompt is not None:
        return prompt(images)
    if not torch.is_floating_point(images):
        return images.float().div_(255.0)
    return images


class LabelMapping(nn.Module):
    """Picks target logits out of source logits: ``forward(logits) = logits[:, mapping]``.

    ``mapping`` is a buffer (identity until fitted); ``fitted`` a bool buffer, so a restored
    FLM mapping is not refitted. Mode "none" passes logits through (model with a target head).
    """

    mapping: torch.Tensor
    fitted: torch.Tensor

    def __init__(self, num_target: int, mode: str = "flm", num_source: int | None = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if num_source is not None and num_source < num_target:
            raise ValueError(f"num_source ({num_source}) < num_target ({num_target})")
        self.num_target = int(num_target)
        self.num_source = None if num_source is None else int(num_source)
        self.mode = mode
        self.register_buffer("mapping", torch.arange(self.num_target, dtype=torch.long))
        self.register_buffer("fitted", torch.tensor(False))
        # Counts behind the current mapping, kept for logging/diagnostics; not saved.
        self.counts: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"num_target={self.num_target}, mode={self.mode!r}, fitted={bool(self.fitted)}"

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return logits
        return logits.index_select(1, self.mapping)

    def set_mapping(self, mapping: torch.Tensor) -> None:
        mapping = torch.as_tensor(mapping, dtype=torch.long).reshape(-1)
        if mapping.numel() != self.num_target:
            raise ValueError(f"mapping has {mapping.numel()} entries, expected {self.num_target}")
        if torch.unique(mapping).numel() != mapping.numel():
            raise ValueError("mapping must be one-to-one (a source class used twice)")
        self.mapping.copy_(mapping.to(self.mapping.device))
        self.fitted.fill_(True)

    @torch.no_grad()
    def fit(
        self,
        model: nn.Module,
        loader: Iterable,
        prompt: Callable | None = None,
        device: str | torch.device = "cpu",
        reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> LabelMapping:
        """Compute the greedy mapping from the (prompted) model's predictions over ``loader``.

        No-op in mode "none". Model and prompt run in eval mode; their modes are restored.
        ``reduce_counts`` combines the counts of data shards (an all-reduce under DDP) so every
        rank derives the same mapping.
        """
        if self.mode == "none":
            return self
        modules = [m for m in (model, prompt) if isinstance(m, nn.Module)]
        was_training = [m.training for m in modules]
        for module in modules:
            module.eval()
        counts = None
        try:
            for batch in loader:
                images, labels = batch[0], batch[1]
                logits = model(_to_network_input(images.to(device), prompt))
                num_source = logits.shape[1]
                if self.num_source is not None and num_source != self.num_source:
                    raise ValueError(f"model gives {num_source} logits, expected {self.num_source}")
                batch_counts = prediction_counts(
                    logits.argmax(dim=1).cpu(), labels.cpu(), num_source, self.num_target
                )
                counts = batch_counts if counts is None else counts + batch_counts
        finally:
            for module, training in zip(modules, was_training):
                module.train(training)
        if counts is None:
            raise ValueError("loader yielded no batches; cannot fit a label mapping")
        if reduce_counts is not None:
            counts = reduce_counts(counts)
        self.counts = counts
        self.set_mapping(greedy_label_mapping(counts))
        return self

    def on_epoch_start(
        self,
        model: nn.Module,
        loader: Iterable,
        prompt: Callable | None = None,
        device: str | torch.device = "cpu",
        reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> bool:
        """Refit for "ilm" (every epoch) and for an unfitted "flm"; returns whether it refit."""
        if self.mode == "ilm" or (self.mode == "flm" and not bool(self.fitted)):
            self.fit(model, loader, prompt, device, reduce_counts)
            return True
        return False
