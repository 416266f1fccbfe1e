"""Datasets for VPNs: one entry point, `load_dataset`, giving train / val / test splits.

Every item is ``(image, label)``: ``image`` a ``uint8`` tensor ``(3, S, S)`` (grayscale repeated
to three channels), ``label`` an ``int``. Nothing is normalized here: the prompt op normalizes
and accepts uint8, and uint8 keeps in-memory datasets four times smaller than float32.

What each dataset expects on disk (``data_dir`` is the folder *containing* the named folder; the
named folder itself is accepted too):

``digits``
    Nothing. scikit-learn's 8x8 handwritten digits (``sklearn.datasets.load_digits``) ship inside
    that package. It has no official test split, so a fixed, stratified 20% test split is drawn
    with seed 0 whatever the run's seed, so every run is scored on the same images.
``cifar10``
    The "python version" from https://www.cs.toronto.edu/~kriz/cifar.html, extracted:
    ``cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch, batches.meta}``.
``cifar100``
    Likewise: ``cifar-100-python/{train, test, meta}``; fine labels (100 classes).
``tiny-imagenet``
    ``tiny-imagenet-200/{wnids.txt, words.txt (optional), train/<wnid>/images/*.JPEG,
    val/images/*.JPEG, val/val_annotations.txt}``. Its val set is the test split (the official
    test set has no labels). Classes are the wnids sorted, as torchvision's ImageFolder orders
    them; ``classes`` holds the words.txt names when that file exists, ``class_ids`` the wnids.
``imagefolder``
    ``<data_dir>/train/<class>/**/<image>`` and ``<data_dir>/test/<class>/**/<image>`` (or
    ``val/`` when there is no ``test/``). Classes are the train folder names, sorted.
``synthetic``
    Nothing: random images of any size and class count, deterministic from ``seed``, for
    throughput work. Each class has its own mean colour, so a model can learn something.

Your own data: :func:`dataset_splits` takes any ``torch.utils.data.Dataset`` (or train / val / test
datasets) whose items are ``(image, label)``: ``image`` a tensor ``(C, H, W)`` with C 1 or 3, either
``uint8`` in [0, 255] or floating point in [0, 1] (not normalized: the input stage normalizes), ``label``
an integer in ``[0, num_classes)``. Images are resized to the run's size and augmented like the named
datasets' (``train_augmented``).

The network is touched only with ``download=True`` (CIFAR through torchvision's downloader,
Tiny-ImageNet through its zip); offline and without the files, a FileNotFoundError names the
folder looked in and the layout expected.

Splits: ``val`` is held out from the official training split (default 10%, stratified, seeded
by ``seed``), never overlapping ``train``; ``train`` and ``train_augmented`` are the same samples
with the two transforms of the release protocol: test-style (resize to S) and train
augmentation (resize to round(S * 252 / 224), random crop S, random horizontal flip).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import unicodedata
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchvision.transforms.v2 import functional as TF

from vpns_fast.errors import MissingFilesError, SettingError

__all__ = [
    "DATASETS",
    "DataSplits",
    "ImageDataset",
    "ResizeTransform",
    "SeededItems",
    "TrainAugmentation",
    "augment_batch",
    "augmentation_resize_size",
    "dataset_splits",
    "item_seed",
    "load_dataset",
    "make_loader",
    "resize_batch",
    "seed_worker",
]

DATASETS = ("digits", "cifar10", "cifar100", "tiny-imagenet", "imagefolder", "synthetic")
FOLDER_DATASETS = ("cifar10", "cifar100", "tiny-imagenet", "imagefolder")  # read from a data_dir

# Spellings people type for the same dataset.
_ALIASES = {
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "tinyimagenet": "tiny-imagenet",
    "tiny-imagenet-200": "tiny-imagenet",
    "image-folder": "imagefolder",
}

_NATURAL_SIZE = {
    "digits": 32,  # 8x8 is too small for any pretrained backbone's stem; 32 matches CIFAR.
    "cifar10": 32,
    "cifar100": 32,
    "tiny-imagenet": 64,
    "imagefolder": 224,
    "synthetic": 32,
}

DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

# An in-memory dataset is resized once, up front, when the resized copy stays under this size;
# above it (CIFAR at 224 would be 7.5 GB) each item is resized when it is read.
PRE_RESIZE_BUDGET_BYTES = 128 * 2**20

_CIFAR10_URL_HINT = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR100_URL_HINT = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
_TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


# --------------------------------------------------------------------------------------------
# Transforms


def augmentation_resize_size(image_size: int) -> int:
    """Side the train augmentation resizes to before cropping: the release's 252 -> 224 ratio."""
    return round(image_size * 252 / 224)


def _resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    # The release resizes to a square (aspect not kept), so do we.
    return _resize(image, size, size)


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if image.shape[-2] == height and image.shape[-1] == width:
        return image
    return TF.resize(image, [height, width], antialias=True)


class ResizeTransform:
    """Test-style transform: resize to ``size`` x ``size``, nothing random."""

    def __init__(self, size: int):
        self.size = size
        self.resize_to = size

    def finish(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return image

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.finish(_resize_square(image, self.resize_to))

    def __repr__(self) -> str:
        return f"ResizeTransform(size={self.size})"


class TrainAugmentation:
    """Release train augmentation: resize to round(S*252/224), random crop S, random h-flip.

    Draws from ``generator``, or torch's global RNG when None. The trainer's loaders read items through
    :class:`SeededItems`, which hands each item a generator seeded from (the loader's seed, the item's
    index), so a crop does not depend on which process draws it or on what was drawn before.
    """

    def __init__(self, size: int):
        self.size = size
        self.resize_to = augmentation_resize_size(size)

    def finish(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        span = self.resize_to - self.size
        top = int(torch.randint(0, span + 1, (1,), generator=generator).item())
        left = int(torch.randint(0, span + 1, (1,), generator=generator).item())
        image = image[..., top : top + self.size, left : left + self.size]
        if bool(torch.rand((), generator=generator) < 0.5):
            image = image.flip(-1)
        return image.contiguous()

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.finish(_resize_square(image, self.resize_to))

    def __repr__(self) -> str:
        return f"TrainAugmentation(size={self.size}, resize_to={self.resize_to})"


def resize_batch(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Test-style transform on a batch ``(B, C, H, W)`` on any device (same op as per item); ``size`` may be
    ``(H, W)`` for a network trained on images that are not square."""
    if isinstance(size, int):
        return _resize_square(images, size)
    return _resize(images, int(size[0]), int(size[1]))


def augment_batch(
    images: torch.Tensor, size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Train augmentation on a whole batch ``(B, C, H, W)`` on its device, one crop and flip
    per image. For loading at the natural size and augmenting on the GPU, where per-item
    CPU resizing (CIFAR 32 -> 252) would starve it. ``generator`` must live on the batch's
    device; None uses torch's default RNG for that device.
    """
    resize_to = augmentation_resize_size(size)
    images = _resize_square(images, resize_to)
    batch, device = images.shape[0], images.device
    span = resize_to - size
    top = torch.randint(0, span + 1, (batch,), generator=generator, device=device)
    left = torch.randint(0, span + 1, (batch,), generator=generator, device=device)
    flip = torch.rand((batch,), generator=generator, device=device) < 0.5
    steps = torch.arange(size, device=device)
    rows = top[:, None] + steps
    cols = torch.where(flip[:, None], left[:, None] + (size - 1) - steps, left[:, None] + steps)
    # One gather for every image's crop and flip instead of a Python loop over the batch.
    return images[
        torch.arange(batch, device=device)[:, None, None, None],
        torch.arange(images.shape[1], device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


# --------------------------------------------------------------------------------------------
# Sources (where pixels come from) and the one Dataset class over them


class _TensorSource:
    """All images in one uint8 tensor (N, C, H, W), C in {1, 3}; shared by every split view."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        assert images.dtype == torch.uint8 and images.dim() == 4, (images.dtype, images.shape)
        self.images = images
        self.labels = labels.to(torch.int64)
        self._resized: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.images.shape[0]

    def prepare(self, size: int) -> None:
        """Resize everything once when cheap. Done in the parent process so DataLoader workers
        share the result instead of each building its own copy."""
        if size in self._resized or (self.images.shape[-2:] == (size, size)):
            return
        n, c = self.images.shape[:2]
        if n * c * size * size <= PRE_RESIZE_BUDGET_BYTES:
            self._resized[size] = _resize_square(self.images, size)

    def image(self, index: int, size: int) -> torch.Tensor:
        if size in self._resized:
            image = self._resized[size][index].clone()  # a view would let callers edit the cache
        elif self.images.shape[-2:] == (size, size):
            image = self.images[index].clone()
        else:
            image = _resize_square(self.images[index], size)
        return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


# 16-bit grayscale (PNG, TIFF); PIL's RGB conversion clips these to 255 instead of scaling them
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def decode_image(path: str) -> torch.Tensor:
    """An image file as a uint8 (3, H, W) RGB tensor, every PIL mode scaled to the 0..255 range.

    8-bit modes (1, L, P, RGB, RGBA, CMYK, YCbCr, LAB, HSV, ...) go through PIL's RGB conversion
    (alpha dropped); 16-bit grayscale is scaled by 255 / 65535 (16-bit RGB PNGs PIL already reads as
    8-bit); float images (mode F) must hold finite values in [0, 1] and are scaled by 255. Anything
    else (32-bit integer images, values out of range, files that are not images) raises ValueError
    naming the file.
    """
    # PIL rather than torchvision.io: its decoders are deprecated since torchvision 0.29, and
    # PIL reads every format ImageFolder users have (BMP, TIFF, PPM...), not just JPEG/PNG.
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # PIL raises past twice its limit and only warns between, where a 10000 x 10000 PNG of 120 KB was
            # decoded into 1.7 GB (an outside review): its warning is an error here too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            pil = Image.open(path)
        with pil:
            array = _rgb_array(pil, path)
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # a small file, gigabytes decoded
        raise ValueError(f"{path}: {exc.args[0].split(' could be')[0].rstrip(', ')} (PIL.Image.MAX_IMAGE_PIXELS guards "
                         "against decompression bombs)") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: cannot read the image: it is a folder") from None
    except OSError as exc:  # a missing file or no permission (strerror), or a broken image (PIL's message)
        raise ValueError(f"{path}: cannot read the image: {exc.strerror if exc.filename else exc}") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _rgb_array(pil, path) -> np.ndarray:
    """(H, W, 3) uint8 of an open PIL image; see decode_image for the rules."""
    mode = pil.mode
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and pil.format == "PNG"):  # older PIL reads 16-bit PNGs as I
        gray = np.asarray(pil).astype(np.int64)
        if gray.size and (gray.min() < 0 or gray.max() > 65535):
            raise ValueError(f"{path}: mode {mode} values outside the 16-bit range 0..65535")
        gray = ((gray * 255 + 32767) // 65535).astype(np.uint8)
    elif mode == "F":
        gray = np.asarray(pil, dtype=np.float32)
        if not np.isfinite(gray).all():
            raise ValueError(f"{path}: float image (mode F) holds NaN or Inf pixels")
        low, high = (float(gray.min()), float(gray.max())) if gray.size else (0.0, 0.0)
        if low < 0.0 or high > 1.0:
            raise ValueError(f"{path}: float image (mode F) must hold values in [0, 1], got [{low:g}, {high:g}]")
        gray = np.rint(gray * 255).astype(np.uint8)
    elif mode == "I" or mode.startswith("I;"):
        raise ValueError(f"{path}: image mode {mode} (integer pixels of unknown range) is not supported; "
                         "save it as 8- or 16-bit")
    else:
        try:
            return np.asarray(pil.convert("RGB")).copy()
        except ValueError as exc:  # an OSError (a cut-off file, decoded here on first use) is decode_image's
            raise ValueError(f"{path}: image mode {mode} cannot be converted to RGB ({exc})") from None
    return np.repeat(gray[:, :, None], 3, axis=2)


class _FileSource:
    """Image files decoded when read (Tiny-ImageNet is 100k files; ImageFolders can be huge)."""

    def __init__(self, paths: Sequence[str], labels: torch.Tensor):
        self.paths = list(paths)
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def prepare(self, size: int) -> None:
        pass

    def image(self, index: int, size: int) -> torch.Tensor:
        return _resize_square(decode_image(self.paths[index]), size)


class ImageDataset(Dataset):
    """A view of a source: the samples at ``indices`` (into the source), under ``transform``.

    ``train``, ``train_augmented`` and ``val`` share one source, so ``indices`` tell which of
    the official training samples each holds.
    """

    def __init__(self, source, indices: torch.Tensor, transform: ResizeTransform | TrainAugmentation):
        self.source = source
        self.indices = indices.to(torch.int64)
        self.transform = transform
        source.prepare(transform.resize_to)

    def __len__(self) -> int:
        return int(self.indices.numel())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.item(i)

    def item(self, i: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """Item ``i``, its augmentation (if any) drawn from ``generator`` (torch's global RNG when None)."""
        j = int(self.indices[i])
        image = self.source.image(j, self.transform.resize_to)
        return self.transform.finish(image, generator), int(self.source.labels[j])

    @property
    def labels(self) -> torch.Tensor:
        """Labels of this view's samples, in order (int64), without decoding any image."""
        return self.source.labels[self.indices]

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole view stacked: images (N, 3, S, S) uint8 and labels (N,) int64. For label
        mapping or evaluation passes that want one tensor on the device, not a loader."""
        if len(self) == 0:
            size = self.transform.size
            return torch.empty((0, 3, size, size), dtype=torch.uint8), self.labels
        images = torch.stack([self[i][0] for i in range(len(self))])
        return images, self.labels

    def __repr__(self) -> str:
        return f"ImageDataset(n={len(self)}, transform={self.transform!r})"


# --------------------------------------------------------------------------------------------
# Splits


@dataclass
class DataSplits:
    name: str
    image_size: int
    num_classes: int
    classes: list[str]
    train: Dataset  # test-style transform (resize only)
    train_augmented: Dataset  # same samples, train augmentation
    val: Dataset  # held out from train, test-style
    test: Dataset  # test-style
    class_ids: list[str] = field(default_factory=list)  # wnids / folder names; else = classes

    def fingerprint(self) -> dict:
        """What the splits hold: the class names, and per split its size and a sha256 of its items in order (image
        files by their path below the files' common folder, other sources by position). A resumed run compares it
        with the one it started from: images added to a folder had redrawn the val split from training images,
        and a renamed class had permuted the labels mid-run, without a word (an outside review)."""
        views = {name: getattr(self, name) for name in ("train", "val", "test")}
        paths = [path for view in views.values() for path in _item_paths(view) or ()]
        common = os.path.commonpath(paths) if paths else ""
        splits = {}
        for name, view in views.items():
            items = _item_paths(view)
            items = ([os.path.relpath(path, common) for path in items] if items is not None
                     else [int(i) for i in getattr(view, "indices", torch.arange(len(view)))])
            splits[name] = {"size": len(view), "sha256": hashlib.sha256(json.dumps(items).encode()).hexdigest()}
        return {"classes": list(self.classes), "splits": splits}

    def summary(self) -> str:
        return (
            f"{self.name}: {self.num_classes} classes, {self.image_size}x{self.image_size}, "
            f"train {len(self.train)} / val {len(self.val)} / test {len(self.test)}"
        )


def _item_paths(view) -> list[str] | None:
    """The image file of each item of a split, in order, where its source is files; else None."""
    source, indices = getattr(view, "source", None), getattr(view, "indices", None)
    if not isinstance(source, _FileSource) or indices is None:  # a user's dataset: its items by position
        return None
    return [source.paths[int(i)] for i in indices]


def _choose(labels: torch.Tensor, count: int, generator: torch.Generator, stratify: bool) -> torch.Tensor:
    """Positions of ``count`` samples drawn without replacement, sorted.

    Stratified: each class gives its share of ``count`` rounded down, and the samples still
    missing go to the classes with the largest rounding remainders (ties broken at random), so
    the total is exactly ``count`` and every class is within one sample of its share.
    """
    n = labels.numel()
    if count <= 0:
        return torch.empty(0, dtype=torch.int64)
    if count >= n:
        return torch.arange(n)
    if not stratify:
        return torch.randperm(n, generator=generator)[:count].sort().values
    classes, counts = torch.unique(labels, return_counts=True)
    ideal = counts.to(torch.float64) * count / n
    take = ideal.floor().to(torch.int64)
    missing = count - int(take.sum())
    if missing > 0:
        order = torch.randperm(classes.numel(), generator=generator)
        remainder = (ideal - take)[order]
        ranked = order[torch.sort(remainder, descending=True, stable=True).indices]
        take[ranked[:missing]] += 1
    chosen = []
    for cls, k in zip(classes.tolist(), take.tolist()):
        members = (labels == cls).nonzero().flatten()
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:k]])
    return torch.cat(chosen).sort().values


def _split(
    labels: torch.Tensor, fraction: float, seed: int, stratify: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held_out) positions, disjoint, together all of ``range(len(labels))``."""
    n = labels.numel()
    held_out = _choose(labels, math.floor(fraction * n + 0.5), torch.Generator().manual_seed(seed), stratify)
    keep_mask = torch.ones(n, dtype=torch.bool)
    keep_mask[held_out] = False
    return keep_mask.nonzero().flatten(), held_out


def _limit(indices: torch.Tensor, labels: torch.Tensor, limit: int | None, seed: int) -> torch.Tensor:
    if limit is None or indices.numel() <= limit:
        return indices
    # A seeded stratified subset, not the first `limit` files, which are often one class.
    generator = torch.Generator().manual_seed(seed + 7919)
    return indices[_choose(labels[indices], limit, generator, stratify=True)]


def _assemble(
    name: str,
    image_size: int,
    classes: list[str],
    train_source,
    test_source,
    val_fraction: float,
    seed: int,
    stratify: bool,
    limit: int | None,
    class_ids: list[str] | None = None,
    train_pool: torch.Tensor | None = None,
) -> DataSplits:
    pool = torch.arange(len(train_source)) if train_pool is None else train_pool
    kept, held_out = _split(train_source.labels[pool], val_fraction, seed, stratify)
    train_idx = _limit(pool[kept], train_source.labels, limit, seed)
    val_idx = _limit(pool[held_out], train_source.labels, limit, seed + 1)
    test_idx = _limit(torch.arange(len(test_source)), test_source.labels, limit, seed + 2)
    test_style = ResizeTransform(image_size)
    return DataSplits(
        name=name,
        image_size=image_size,
        num_classes=len(classes),
        classes=list(classes),
        train=ImageDataset(train_source, train_idx, test_style),
        train_augmented=ImageDataset(train_source, train_idx, TrainAugmentation(image_size)),
        val=ImageDataset(train_source, val_idx, test_style),
        test=ImageDataset(test_source, test_idx, test_style),
        class_ids=list(class_ids) if class_ids is not None else list(classes),
    )


# --------------------------------------------------------------------------------------------
# Readers


def _locate(data_dir: str | os.PathLike, folder: str, marker: str) -> Path:
    """``data_dir/folder`` if it exists, else ``data_dir`` itself when it already is that folder."""
    root = Path(data_dir).expanduser()
    if (root / folder).is_dir() or not (root / marker).exists():
        return root / folder
    return root


def _missing(what: str, looked_in: Path, layout: str, how_to_get: str) -> MissingFilesError:
    # told as data_dir's refusal, without a flag's name: the command line names the flag or config file that set it
    return MissingFilesError("data_dir", f"{what} not found in {looked_in}. Expected layout: {layout}. {how_to_get}")


def _read_cifar_pickle(path: Path) -> dict:
    # pickle can run code from a crafted file; it is read here only because the official
    # CIFAR "python version" is distributed as pickles and has no other format.
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as exc:
        raise ValueError(f"{path} is not a CIFAR python-version pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{path} is not a CIFAR python-version pickle (it holds a {type(entry).__name__})")
    return entry


def _cifar_arrays(paths: Sequence[Path], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for path in paths:
        entry = _read_cifar_pickle(path)
        try:
            data = np.asarray(entry[b"data"], dtype=np.uint8)
            # Rows are 3072 bytes: the 1024 red, then green, then blue values of a 32x32 image.
            images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
            labels.append(torch.as_tensor(list(entry[label_key]), dtype=torch.int64))
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{path} is not a CIFAR python-version pickle ({type(exc).__name__}: {exc})") from None
    return torch.cat(images), torch.cat(labels)


def _names(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _load_cifar(variant: str, data_dir, download: bool):
    if variant == "cifar10":
        folder, train_files, test_file, meta_file = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            "test_batch",
            "batches.meta",
        )
        label_key, names_key, url, title = b"labels", b"label_names", _CIFAR10_URL_HINT, "CIFAR-10"
    else:
        folder, train_files, test_file, meta_file = "cifar-100-python", ["train"], "test", "meta"
        label_key, names_key, url, title = b"fine_labels", b"fine_label_names", _CIFAR100_URL_HINT, "CIFAR-100"
    root = _locate(data_dir, folder, train_files[0])
    needed = train_files + [test_file, meta_file]
    if download and not all((root / f).is_file() for f in needed):
        _download_cifar(variant, Path(data_dir).expanduser(), root)
    missing = [f for f in needed if not (root / f).is_file()]
    if missing:
        raise _missing(
            f"{title} (missing {', '.join(missing)})",
            root,
            f"{folder}/{{{', '.join(needed)}}} in the data folder (the 'python version' pickles from {url}, "
            f"extracted)",
            "Pass download=True (--download) when online to fetch it, or extract the archive "
            "into that folder.",
        )
    train_images, train_labels = _cifar_arrays([root / f for f in train_files], label_key)
    test_images, test_labels = _cifar_arrays([root / test_file], label_key)
    meta = _read_cifar_pickle(root / meta_file)
    if names_key not in meta:
        raise ValueError(f"{root / meta_file} is not a CIFAR python-version pickle (no {names_key!r} entry)")
    classes = _names(meta[names_key])
    return classes, _TensorSource(train_images, train_labels), _TensorSource(test_images, test_labels)


def _download_cifar(variant: str, data_dir: Path, root: Path) -> None:
    import torchvision.datasets

    dataset_class = torchvision.datasets.CIFAR10 if variant == "cifar10" else torchvision.datasets.CIFAR100
    # torchvision extracts into data_dir/<folder>, the layout read above; its dataset object is
    # not used to read, only to fetch and verify the archive.
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        dataset_class(root=str(data_dir), train=True, download=True)
    except Exception as exc:  # offline: URLError / OSError / checksum failures
        raise FileNotFoundError(
            f"download of {variant} into {data_dir} failed ({type(exc).__name__}: {exc}); "
            f"expected {root} afterwards. Download it on a machine with internet access and "
            f"copy the extracted folder there."
        ) from exc


def _images_in(folder: Path, seen: set[str]) -> tuple[list[str], int]:
    """(the image files under ``folder``, how many of them ``seen`` already held): sorted, links followed; hidden
    files and folders (".ipynb_checkpoints", macOS "._name.png") left out, and a file already in ``seen`` (real
    paths, updated) or a folder already walked not read again. A link back to its own folder had read a class's
    files many times over, the same files landing in train and val (an outside review)."""
    found, walked, repeated = [], set(), 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)  # once a folder: a file's own real path is asked only where it is a link
        if real in walked:
            dirnames[:] = []
            continue
        walked.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # sorted keeps runs identical
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(dirpath, name)
            key = os.path.realpath(path) if os.path.islink(path) else os.path.join(real, name)
            if key in seen:
                repeated += 1
                continue
            seen.add(key)
            found.append(path)
    return found, repeated


_TINY_LAYOUT = (
    "tiny-imagenet-200/{wnids.txt, words.txt (optional), train/<wnid>/images/*.JPEG, "
    "val/images/*.JPEG, val/val_annotations.txt}"
)


def _load_tiny_imagenet(data_dir, download: bool):
    root = _locate(data_dir, "tiny-imagenet-200", "wnids.txt")
    annotations = root / "val" / "val_annotations.txt"
    if download and not (root / "train").is_dir():
        from torchvision.datasets.utils import download_and_extract_archive

        target = Path(data_dir).expanduser()
        try:
            download_and_extract_archive(_TINY_IMAGENET_URL, download_root=str(target))
        except Exception as exc:
            raise FileNotFoundError(
                f"download of Tiny-ImageNet from {_TINY_IMAGENET_URL} into {target} failed "
                f"({type(exc).__name__}: {exc}); expected layout {_TINY_LAYOUT}"
            ) from exc
    if not (root / "train").is_dir() or not annotations.is_file():
        raise _missing(
            "Tiny-ImageNet",
            root,
            _TINY_LAYOUT,
            f"Pass download=True (--download) when online to fetch {_TINY_IMAGENET_URL}, or "
            f"unzip it in the data folder.",
        )
    if (root / "wnids.txt").is_file():
        wnids = sorted({w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()})
    else:
        wnids = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    index = {w: i for i, w in enumerate(wnids)}

    train_paths, train_labels = [], []
    for wnid in wnids:
        folder = root / "train" / wnid
        folder = folder / "images" if (folder / "images").is_dir() else folder
        files, _ = _images_in(folder, set())
        train_paths += files
        train_labels += [index[wnid]] * len(files)
    if not train_paths:
        raise _missing("Tiny-ImageNet training images", root / "train", _TINY_LAYOUT, "")

    test_paths, test_labels = [], []
    for line_number, line in enumerate(annotations.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or fields[1] not in index:
            raise ValueError(
                f"{annotations}:{line_number}: expected '<file>\\t<wnid>\\t...' with a wnid "
                f"from wnids.txt, got {line!r}"
            )
        test_paths.append(str(root / "val" / "images" / fields[0]))
        test_labels.append(index[fields[1]])

    names = {}
    if (root / "words.txt").is_file():
        for line in (root / "words.txt").read_text().splitlines():
            wnid, _, words = line.partition("\t")
            names[wnid.strip()] = words.strip()
    classes = [names.get(w) or w for w in wnids]
    return (
        classes,
        wnids,
        _FileSource(train_paths, torch.tensor(train_labels, dtype=torch.int64)),
        _FileSource(test_paths, torch.tensor(test_labels, dtype=torch.int64)),
    )


_FOLDER_LAYOUT = "<data_dir>/train/<class>/<images> and <data_dir>/test/<class>/<images> (or val/)"


def _load_imagefolder(data_dir):
    root = Path(data_dir).expanduser()
    test_root = root / "test" if (root / "test").is_dir() else root / "val"
    if not (root / "train").is_dir() or not test_root.is_dir():
        raise _missing(
            "ImageFolder dataset",
            root,
            _FOLDER_LAYOUT,
            "There is no download for an ImageFolder: the data folder must hold train/ and test/.",
        )
    classes = _class_folders(root / "train")
    if not classes:
        raise _missing("class folders", root / "train", _FOLDER_LAYOUT, "")
    unknown = [name for name in _class_folders(test_root) if name not in classes]
    if unknown:
        same_looking = [name for name in unknown if unicodedata.normalize("NFC", name) in
                        {unicodedata.normalize("NFC", c) for c in classes}]
        raise ValueError(f"{test_root} has class folders not in {root / 'train'}: {unknown}"
                         + (f" ({same_looking} differ from a train folder only in their Unicode normalization, NFC "
                            "against NFD: rename one)" if same_looking else ""))

    def scan(split_root: Path, refuse_empty: bool, seen: set[str]):
        paths, labels = [], []
        for label, cls in enumerate(classes):
            if (split_root / cls).is_dir():
                files, repeated = _images_in(split_root / cls, seen)
                if not files and refuse_empty:  # an output class no image teaches, shifting the later classes' labels
                    raise ValueError(f"{split_root / cls}: a class folder without images "
                                     f"({', '.join(IMAGE_EXTENSIONS)})" + (
                                         f" of its own: its {repeated} are files an earlier class folder holds "
                                         "(through links)" if repeated else "") + "; remove it or add its images")
                paths += files
                labels += [label] * len(files)
        if not paths:
            raise _missing(f"images ({', '.join(IMAGE_EXTENSIONS)})", split_root, _FOLDER_LAYOUT, "")
        return _FileSource(paths, torch.tensor(labels, dtype=torch.int64))

    in_train: set[str] = set()
    in_test: set[str] = set()
    train, test = scan(root / "train", True, in_train), scan(test_root, False, in_test)
    if in_train & in_test:
        raise ValueError(f"{test_root}: {len(in_train & in_test)} of its images are files {root / 'train'} also "
                         "holds (through links): test images must not be trained on")
    return classes, train, test


def _class_folders(split_root: Path) -> list[str]:
    """The class folder names of a split, sorted; hidden folders (".ipynb_checkpoints") are none."""
    return sorted(p.name for p in split_root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _load_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16; spread them over 0..255 so they look like any other uint8 image.
    pixels = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = torch.from_numpy(pixels).unsqueeze(1)  # (N, 1, 8, 8); channels repeated when read
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return [str(c) for c in bunch.target_names], _TensorSource(images, labels)


def _synthetic(samples: int, classes: int, size: int, seed: int) -> tuple[_TensorSource, _TensorSource]:
    generator = torch.Generator().manual_seed(seed)
    test_samples = max(1, samples // 5)
    total = samples + test_samples
    labels = (torch.arange(total) % classes)[torch.randperm(total, generator=generator)]
    colours = torch.randint(0, 256, (classes, 3, 1, 1), generator=generator, dtype=torch.int16)
    noise = torch.randint(0, 256, (total, 3, size, size), generator=generator, dtype=torch.int16)
    images = ((noise + colours[labels]) // 2).to(torch.uint8)
    return (
        _TensorSource(images[:samples], labels[:samples]),
        _TensorSource(images[samples:], labels[samples:]),
    )


# --------------------------------------------------------------------------------------------
# A user's own datasets


class _DatasetView(Dataset):
    """The items of a user's dataset at ``indices``, checked and resized (or augmented) like ours."""

    def __init__(self, dataset: Dataset, indices: torch.Tensor, transform: ResizeTransform | TrainAugmentation,
                 num_classes: int):
        self.dataset = dataset
        self.indices = indices.to(torch.int64)
        self.transform = transform
        self.num_classes = num_classes

    def __len__(self) -> int:
        return int(self.indices.numel())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        image, label = _checked_item(self.dataset[j], j, self.num_classes)
        image = image.expand(3, -1, -1) if image.shape[0] == 1 else image
        return self.transform(image), label

    def __repr__(self) -> str:
        return f"_DatasetView({type(self.dataset).__name__}, n={len(self)}, transform={self.transform!r})"


# Float images may overshoot [0, 1] by this much (bicubic / Lanczos resizing rings past the ends); a 0..255
# image passed as float, or NaN / Inf pixels, would give silently wrong logits instead.
FLOAT_PIXEL_SLACK = 0.1


def check_float_pixel_range(low: float, high: float, what: str) -> None:
    """ValueError starting with ``what`` unless float pixels from ``low`` to ``high`` (their smallest and largest,
    NaN where any is) are finite and in [0, 1] within FLOAT_PIXEL_SLACK. One rule for the images a deployed model
    is given and those a run trains on."""
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{what}: NaN or Inf pixels")
    if low < -FLOAT_PIXEL_SLACK or high > 1 + FLOAT_PIXEL_SLACK:
        raise ValueError(f"{what}: float pixels must lie in [0, 1], got values in [{low:g}, {high:g}] "
                         "(0..255 images: pass them as uint8, or divide by 255; images already normalized by a mean "
                         "and std: pass them before that, the network's input stage normalizes)")


def _expected_item(num_classes: int) -> str:
    return ("an (image, label) pair, image a uint8 [0, 255] or float [0, 1] tensor (C, H, W) with C 1 or 3, "
            f"label an integer in [0, {num_classes})")


def _checked_item(item, index: int, num_classes: int) -> tuple[torch.Tensor, int]:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise ValueError(f"dataset item {index}: expected {_expected_item(num_classes)}, got {type(item).__name__}")
    image, label = item[0], item[1]
    valid_image = (isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[0] in (1, 3)
                   and (image.dtype == torch.uint8 or image.is_floating_point()))
    label = int(label) if isinstance(label, (int, np.integer)) or (
        isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point()) else None
    if not valid_image or label is None or not 0 <= label < num_classes:
        shape = (f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor)
                 else type(image).__name__)
        raise ValueError(f"dataset item {index}: expected {_expected_item(num_classes)}, got image {shape}, "
                         f"label {item[1]!r}")
    if image.is_floating_point() and image.numel():
        # a 0..255 image given as float trained on inputs 255 times too large, without a word (an outside review)
        check_float_pixel_range(*(value.item() for value in torch.aminmax(image.detach())), f"dataset item {index}")
    return image, label


def _known_labels(dataset: Dataset) -> torch.Tensor | None:
    """The labels of a dataset when they can be read without loading images (for stratified splits)."""
    if isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) >= 2:
        labels = dataset.tensors[1]
    else:
        labels = getattr(dataset, "targets", getattr(dataset, "labels", None))
    if labels is None:
        return None
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.numel() != len(dataset) or labels.is_floating_point():
        return None
    return labels.to(torch.int64)


def _pick(indices: torch.Tensor, labels: torch.Tensor | None, fraction: float,
          seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) of ``indices``: stratified when the labels are known, uniformly at random otherwise."""
    known = labels[indices] if labels is not None else torch.zeros(indices.numel(), dtype=torch.int64)
    kept, held_out = _split(known, fraction, seed, stratify=labels is not None)
    return indices[kept], indices[held_out]


def _capped(indices: torch.Tensor, labels: torch.Tensor | None, limit: int | None, seed: int) -> torch.Tensor:
    if limit is None or indices.numel() <= limit:
        return indices
    known = labels[indices] if labels is not None else torch.zeros(indices.numel(), dtype=torch.int64)
    return indices[_choose(known, limit, torch.Generator().manual_seed(seed + 7919), stratify=labels is not None)]


def dataset_splits(
    train: Dataset,
    val: Dataset | None = None,
    test: Dataset | None = None,
    *,
    num_classes: int,
    image_size: int,
    classes: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = DIGITS_TEST_FRACTION,
    seed: int = 0,
    limit: int | None = None,
    name: str = "custom",
) -> DataSplits:
    """A user's datasets as :class:`DataSplits` (items as in the module doc).

    Without ``test``, ``test_fraction`` of ``train`` is held out as test, always with seed 0 (every run is
    scored on the same items); without ``val``, ``val_fraction`` of the rest is held out as val, drawn with
    ``seed``. Splits are stratified when the labels can be read without loading images (a ``TensorDataset``,
    or a ``targets`` / ``labels`` attribute), uniformly random otherwise. ``limit`` caps every split.
    """
    for argument, dataset in (("train", train), ("val", val), ("test", test)):
        if dataset is not None and not isinstance(dataset, Dataset):
            raise ValueError(f"{argument}: expected a torch.utils.data.Dataset, got {type(dataset).__name__}")
    _positive_int(num_classes, "num_classes")
    _positive_int(image_size, "image_size")
    _positive_int(limit, "limit", allow_none=True)
    check_fraction(val_fraction, "val_fraction")
    check_fraction(test_fraction, "test_fraction")
    if len(train) == 0:
        raise ValueError("train: expected a non-empty dataset")
    _checked_item(train[0], 0, num_classes)  # a clear error now rather than inside a loader later
    if classes is not None and len(classes) != num_classes:
        raise ValueError(f"classes: expected {num_classes} names, got {len(classes)}")
    train_labels = _known_labels(train)
    pool = torch.arange(len(train))
    test_source, test_idx = test, torch.arange(len(test)) if test is not None else None
    if test is None:
        pool, test_idx = _pick(pool, train_labels, test_fraction, DIGITS_TEST_SEED)
        test_source = train
    val_source, val_idx = val, torch.arange(len(val)) if val is not None else None
    if val is None:
        pool, val_idx = _pick(pool, train_labels, val_fraction, seed)
        val_source = train
    train_idx = _capped(pool, train_labels, limit, seed)
    val_idx = _capped(val_idx, train_labels if val is None else _known_labels(val), limit, seed + 1)
    test_idx = _capped(test_idx, train_labels if test is None else _known_labels(test), limit, seed + 2)
    test_style = ResizeTransform(image_size)
    names = [str(c) for c in classes] if classes is not None else [str(i) for i in range(num_classes)]
    return DataSplits(
        name=name, image_size=image_size, num_classes=num_classes, classes=names,
        train=_DatasetView(train, train_idx, test_style, num_classes),
        train_augmented=_DatasetView(train, train_idx, TrainAugmentation(image_size), num_classes),
        val=_DatasetView(val_source, val_idx, test_style, num_classes),
        test=_DatasetView(test_source, test_idx, test_style, num_classes),
    )


# --------------------------------------------------------------------------------------------
# Entry points


def canonical_dataset_name(name: str) -> str:
    """The DATASETS key of ``name`` (case, "_" and aliases allowed); ValueError for an unknown name."""
    if not isinstance(name, str):
        raise ValueError(f"name: expected one of {', '.join(DATASETS)}, got {name!r}")
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"name: unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return key


def check_fraction(value, argument: str) -> None:
    """ValueError naming ``argument`` unless ``value`` is a number in [0, 1) (a held-out share of a split)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:  # NaN too
        raise SettingError(argument, f"expected a number in [0, 1), got {value!r}")


def _positive_int(value, argument: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SettingError(argument, f"expected an integer >= 1, got {value!r}")


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    download: bool = False,
    synthetic_samples: int = 512,
    synthetic_classes: int = 10,
    limit: int | None = None,
    stratify: bool = True,
) -> DataSplits:
    """Load one of ``DATASETS`` as train / train_augmented / val / test (see the module doc).

    ``image_size`` None means the dataset's natural size (digits 32, CIFAR 32, Tiny-ImageNet 64,
    ImageFolder 224, synthetic 32). ``val_fraction`` of the training split is held out as val,
    stratified by class unless ``stratify=False`` (then uniformly at random), drawn with
    ``seed``; ``seed`` also seeds synthetic images. ``limit`` caps every split (a seeded,
    stratified subset) for quick runs. The network is used only when ``download`` is True.
    """
    key = canonical_dataset_name(name)
    if image_size is not None:
        _positive_int(image_size, "image_size")
    size = int(image_size) if image_size is not None else _NATURAL_SIZE[key]
    check_fraction(val_fraction, "val_fraction")
    _positive_int(limit, "limit", allow_none=True)
    if key in FOLDER_DATASETS and data_dir is None:
        raise SettingError("data_dir", f"{key} needs a data directory (the folder holding its files, see "
                           f"vpns_fast.data's module doc); got None")
    common = dict(val_fraction=float(val_fraction), seed=int(seed), stratify=stratify, limit=limit)

    if key == "digits":
        classes, source = _load_digits()
        pool, test = _split(source.labels, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED, stratify=True)
        splits = _assemble(key, size, classes, source, source, train_pool=pool, **common)
        # Test items live in the same source; restrict the test view to the held-out positions.
        test_idx = _limit(test, source.labels, limit, int(seed) + 2)
        splits.test = ImageDataset(source, test_idx, ResizeTransform(size))
        return splits
    if key in ("cifar10", "cifar100"):
        classes, train, test = _load_cifar(key, data_dir, download)
        return _assemble(key, size, classes, train, test, **common)
    if key == "tiny-imagenet":
        classes, wnids, train, test = _load_tiny_imagenet(data_dir, download)
        return _assemble(key, size, classes, train, test, class_ids=wnids, **common)
    if key == "imagefolder":
        classes, train, test = _load_imagefolder(data_dir)
        return _assemble(key, size, classes, train, test, **common)
    _positive_int(synthetic_samples, "synthetic_samples")
    _positive_int(synthetic_classes, "synthetic_classes")
    train, test = _synthetic(int(synthetic_samples), int(synthetic_classes), size, int(seed))
    classes = [f"class_{i}" for i in range(int(synthetic_classes))]
    return _assemble(key, size, classes, train, test, **common)


_MASK64 = 2**64 - 1


def _mix64(x: int) -> int:
    """splitmix64's finalizer: nearby inputs give unrelated 64-bit outputs."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def item_seed(seed: int, index: int) -> int:
    """The seed of item ``index`` of a loader seeded with ``seed`` (63 bits, so every RNG takes it)."""
    return _mix64((_mix64(int(seed) & _MASK64) + int(index)) & _MASK64) >> 1


def _seed_global_rngs(seed: int) -> torch.Tensor | None:
    """Seed torch's CPU RNG, ``random`` and numpy's global RNG from ``seed``; returns torch's previous
    state for the caller to put back, or None in a DataLoader worker (which draws nothing else).

    Only torch's state comes back: it is the stream the model draws from (dropout, a random prompt,
    score init). ``random`` and numpy stay seeded from the last item: saving and restoring numpy's state
    took 110 us an item against 2 us for torch's (a 32 px item reads in 31 us; 2-core AMD EPYC, torch
    2.14.1), and no part of vpns_fast draws from either (every epoch reseeds them too). Code of your own
    that draws from them in the main process during an epoch should use its own generator."""
    saved = torch.default_generator.get_state() if get_worker_info() is None else None
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    return saved


class SeededItems(Dataset):
    """``dataset`` with each item read with the global RNGs seeded from ``item_seed(seed, index)``.

    A random augmentation (ours, or a user dataset's own transforms on torch's, numpy's or ``random``'s
    global RNG) then depends only on the loader's seed and the item's index: the same in the main process
    and in any DataLoader worker, whatever the number of workers or ranks and the order items are read in,
    and reading an item in the main process leaves torch's RNG as it was. Without it, items read in the
    main process (``num_workers=0``) drew from the stream the model also draws from, and items read in
    workers from per-worker streams, so the worker count changed the results (issue #14). A fresh seed
    per epoch gives fresh augmentations per epoch.

    Our own :class:`ImageDataset` draws only in its transform, so it gets a seeded ``torch.Generator``
    instead (3 us an item); any other dataset gets the global RNGs seeded and torch's restored (10 us an
    item, half of it ``random.seed``); a 32 px item read from memory takes about 30 us, a 224 px one resized
    from 32 px about 900 us (CPU time, 2-core AMD EPYC, torch 2.14.1)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        seed = item_seed(self.seed, i)
        if isinstance(self.dataset, ImageDataset):  # its transform is its only draw: no global RNG to touch
            return self.dataset.item(i, torch.Generator().manual_seed(seed))
        saved = _seed_global_rngs(seed)
        try:
            return self.dataset[i]
        finally:
            if saved is not None:
                torch.default_generator.set_state(saved)

    def __repr__(self) -> str:
        return f"SeededItems({self.dataset!r}, seed={self.seed})"


def _draws_nothing(dataset: Dataset) -> bool:
    """Our resize-only views draw no random numbers, so they skip SeededItems' per-item seeding (the
    release protocol's prompted loader)."""
    return isinstance(dataset, ImageDataset) and isinstance(dataset.transform, ResizeTransform)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: numpy and ``random`` get the worker's torch seed, which the
    loader derives from its generator, so any library augmentation is reproducible too."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    sampler: Sampler | None = None,
    pin_memory: bool = False,
    persistent_workers: bool | None = None,
    collate_fn: Callable | None = None,
    seeded_items: bool = False,
) -> DataLoader:
    """A DataLoader whose shuffling order and worker seeds come from ``seed``.

    The generator is created here, so two loaders made with the same seed yield the same
    order. With ``seeded_items`` every item is read through :class:`SeededItems` (its random
    augmentation drawn from (``seed``, its index)): the batches are then the same for any
    ``num_workers`` and loading draws nothing from the main process's RNG; make a loader per epoch
    with a new seed for new augmentations. Without it, with ``num_workers=0`` the augmentation
    draws from the main process's torch RNG (seed it with ``torch.manual_seed`` for an identical
    run), and in workers from per-worker seeds. Workers persist across epochs by
    default (restarting them each epoch costs seconds on large datasets).
    """
    _positive_int(batch_size, "batch_size")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers: expected an integer >= 0, got {num_workers!r}")
    if sampler is not None and shuffle:
        raise ValueError("shuffle: must be False when a sampler is given (the sampler orders)")
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    if seeded_items and not _draws_nothing(dataset):
        dataset = SeededItems(dataset, seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(int(seed)),
        worker_init_fn=seed_worker,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        collate_fn=collate_fn,
    )
