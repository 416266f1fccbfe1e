"""Accuracy counting: of the splits after every training epoch, and of a saved checkpoint."""
from __future__ import annotations

import contextlib
import os

import torch
from torch.utils.data import Dataset

from vpns_fast.nn.label_mapping import LabelMapping
from vpns_fast.nn.prompted_network import PromptedNetwork
from vpns_fast.ops import IMAGENET_MEAN, IMAGENET_STD
from vpns_fast.training import distributed as dist_utils
from vpns_fast.training.loaders import Loaders


@torch.no_grad()
def count_correct(network: PromptedNetwork, loader, use_prompt: bool, device, autocast=None) -> torch.Tensor:
    """float64 tensor [correct, total] of top-1 predictions over ``loader`` (eval mode)."""
    network.eval()
    counts = torch.zeros(2, dtype=torch.float64)
    for images, labels in loader:
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = network(images.to(device), use_prompt)
        counts[0] += int((logits.argmax(1).cpu() == labels).sum())
        counts[1] += labels.numel()
    return counts


def evaluate_splits(network: PromptedNetwork, splits: list[tuple[str, Dataset]], loaders: Loaders, device,
                    autocast=None) -> dict:
    """``{split}_acc`` (without the prompt) and ``{split}_acc_prompt`` (with it; None when the network
    has none) in percent, counted over all ranks; empty splits are left out."""
    record = {}
    for name, dataset in splits:
        if len(dataset) == 0:
            continue
        loader = loaders.ordered(dataset)
        record[f"{name}_acc"] = _accuracy(network, loader, False, device, autocast)
        record[f"{name}_acc_prompt"] = (_accuracy(network, loader, True, device, autocast)
                                        if network.prompt is not None else None)
    return record


def _accuracy(network: PromptedNetwork, loader, use_prompt: bool, device, autocast) -> float:
    correct, total = dist_utils.all_reduce_sum(count_correct(network, loader, use_prompt, device, autocast)).tolist()
    return 100 * correct / max(total, 1.0)


def _dataset_key(name: str) -> str | None:
    from vpns_fast.data import canonical_dataset_name

    try:
        return canonical_dataset_name(name)
    except ValueError:
        return None


def _shown(names) -> str:
    names = list(names)
    from vpns_fast.errors import first_items

    return first_items(map(repr, names), 6) + (f" ({len(names)} in all)" if len(names) > 6 else "")


def _same_folder(recorded: str | None, given: str | None) -> bool:
    """Whether ``given`` names the data folder the run recorded (both None for a dataset without one)."""
    if recorded is None or given is None:
        return recorded is None and given is None
    return os.path.realpath(recorded) == os.path.realpath(given)


def evaluate_checkpoint(path: str, dataset: str, data_dir: str | None = None, split: str = "test",
                        batch_size: int = 256, device: str = "auto", limit: int | None = None,
                        model=None) -> dict:
    """Top-1 accuracy (%) of a checkpoint on a dataset split, without and (if kept) with its prompt.
    ``model``: a module of the checkpoint's architecture, for a network that was passed as an object."""
    from vpns_fast.data import canonical_dataset_name, load_dataset, make_loader
    from vpns_fast.models import source_num_classes
    from vpns_fast.pruning.checkpoint import load_checkpoint, model_from_checkpoint, prompt_from_spec
    from vpns_fast.pruning.masking import actual_density, masked_layers

    if split not in ("test", "val", "train"):
        raise ValueError(f"split must be test, val or train, got {split!r}")
    from vpns_fast.environment import resolve_device

    device = resolve_device(device)
    payload = load_checkpoint(path)
    model = model_from_checkpoint(payload, model)
    prompt = prompt_from_spec(payload["prompt"]) if payload["prompt"] is not None else None
    # A checkpoint written by the trainer carries its config: evaluate on the same split and at
    # the same image size the run used (its val split depends on split_seed and val_fraction).
    run = payload["meta"].get("config") or {}
    input_size = payload["input_size"]
    if prompt is None and not run.get("image_size") and input_size and input_size[-2] != input_size[-1]:
        # the datasets here resize to squares; the last side alone would evaluate the network on W x W images
        raise ValueError(f"{path}: its network takes {input_size[-2]}x{input_size[-1]} images (input_size "
                         f"{list(input_size)}), and evaluation resizes to squares; run it on your images with "
                         "vpns_fast.deploy(path)")
    image_size = prompt.in_size if prompt is not None else (run.get("image_size") or input_size[-1])
    # the dataset's own key, not its spelling: "ImageFolder" had drawn other splits than the run's "imagefolder",
    # its val split then holding images the run had trained on (an outside review)
    recorded = run.get("dataset")
    same_dataset = isinstance(recorded, str) and _dataset_key(recorded) == canonical_dataset_name(dataset)
    # the run's --limit only on the run's own folder: another folder of the same dataset kind was scored on as
    # many images as the run had used (an outside review); a folder named from another working directory counts
    # as another one (all of its images scored, the limit printed as none). Its val split stays the run's draw.
    run_limit = (run.get("limit") if same_dataset and limit is None
                 and _same_folder(run.get("data_dir"), data_dir) else None)
    data = load_dataset(dataset, data_dir, image_size=image_size, limit=limit if limit is not None else run_limit,
                        val_fraction=run.get("val_fraction", 0.1) if same_dataset else 0.1,
                        seed=run.get("split_seed", 0) if same_dataset else 0)
    trained_on = payload["meta"].get("class_names")
    if trained_on is not None and list(trained_on) != list(data.classes):
        # labels are indices: a folder of other classes, or the same ones in another order, was scored by position
        # (a folder without one class counted the model's right answers for the next class as wrong)
        raise ValueError(f"{path}: its network was trained on the classes {_shown(trained_on)}; the {dataset} data "
                         f"has {_shown(data.classes)}, so its labels mean other classes")
    mapping = LabelMapping(data.num_classes, "none" if payload["label_mapping"] is None else "flm",
                           source_num_classes(model, payload["input_size"][-1] if payload["input_size"] else None))
    if payload["label_mapping"] is not None:
        mapping.set_mapping(payload["label_mapping"])
    mean, std = (prompt.mean, prompt.std) if prompt is not None else (IMAGENET_MEAN, IMAGENET_STD)
    network = PromptedNetwork(model, prompt, mapping, mean, std).to(device)
    if len(getattr(data, split)) == 0:  # scored as accuracy 0.0 (an outside review)
        raise ValueError(f"split {split!r} of {dataset} holds no images"
                         + (" (the run held out no val images: val_fraction 0)"
                            if split == "val" and same_dataset and run.get("val_fraction") == 0 else ""))
    loader = make_loader(getattr(data, split), batch_size, shuffle=False)
    correct, total = count_correct(network, loader, False, device).tolist()
    result = {"checkpoint": path, "dataset": dataset, "split": split, "samples": int(total),
              # every split capped at this many images (given, or the run's own --limit): None for all of them
              "limit": limit if limit is not None else run_limit,
              "accuracy": 100 * correct / max(total, 1), "accuracy_prompt": None,
              "density": actual_density(model) if masked_layers(model) else 1.0}
    if prompt is not None:
        correct, total = count_correct(network, loader, True, device).tolist()
        result["accuracy_prompt"] = 100 * correct / max(total, 1)
    return result
