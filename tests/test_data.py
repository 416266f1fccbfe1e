"""vpns_fast.data: every loader on small files written in the real on-disk formats."""
from __future__ import annotations

import pickle
import socket
import urllib.error

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vpns_fast import data
from vpns_fast.data import (
    DATASETS,
    DataSplits,
    augment_batch,
    augmentation_resize_size,
    load_dataset,
    make_loader,
)


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a connection fails the test: loaders must not touch the network."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ----------------------------------------------------------------------------- writers


def _pixels(n: int, offset: int) -> np.ndarray:
    rng = np.random.default_rng(offset)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def write_cifar10(root, per_batch=6, test=7):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    all_data, all_labels = [], []
    for b in range(1, 6):
        pixels = _pixels(per_batch, b)
        labels = [(b * per_batch + i) % 10 for i in range(per_batch)]
        _dump(folder / f"data_batch_{b}", {b"batch_label": b"x", b"labels": labels, b"data": pixels, b"filenames": []})
        all_data.append(pixels)
        all_labels += labels
    test_pixels = _pixels(test, 99)
    test_labels = [i % 10 for i in range(test)]
    _dump(folder / "test_batch", {b"labels": test_labels, b"data": test_pixels})
    _dump(folder / "batches.meta", {b"label_names": CIFAR10_NAMES, b"num_cases_per_batch": per_batch})
    return np.concatenate(all_data), all_labels, test_pixels, test_labels


def write_cifar100(root, train=20, test=5):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train_pixels, test_pixels = _pixels(train, 1), _pixels(test, 2)
    train_labels = [(7 * i) % 100 for i in range(train)]
    test_labels = [(3 * i) % 100 for i in range(test)]
    _dump(folder / "train", {b"data": train_pixels, b"fine_labels": train_labels, b"coarse_labels": [0] * train})
    _dump(folder / "test", {b"data": test_pixels, b"fine_labels": test_labels, b"coarse_labels": [0] * test})
    names = [f"class{i:03d}".encode() for i in range(100)]
    _dump(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20})
    return train_pixels, train_labels, test_pixels, test_labels


def _image(path, size, colour, mode="RGB"):
    image = Image.new("RGB", size, colour)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)


TINY_WNIDS = ["n02", "n01", "n03"]  # deliberately unsorted, as in the real wnids.txt


def write_tiny_imagenet(root, per_class=4):
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (base / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tshark\nn03\then\nn99\tunused\n")
    for c, wnid in enumerate(TINY_WNIDS):
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
        for i in range(per_class):
            mode = "L" if i == 0 else "RGB"  # Tiny-ImageNet has grayscale JPEGs
            _image(folder / f"{wnid}_{i}.JPEG", (64, 64), (40 * c, 10 * i, 200), mode)
    lines = []
    for i, wnid in enumerate(["n03", "n01", "n02", "n01"]):
        _image(base / "val" / "images" / f"val_{i}.JPEG", (64, 64), (i * 50, 0, 0))
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def write_imagefolder(root, test_name="test"):
    for split, count in (("train", 5), (test_name, 2)):
        for c, cls in enumerate(["dog", "cat"]):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                extension = ".bmp" if i == 1 else ".png"
                _image(folder / f"{i}{extension}", (30 + i, 20), (100 * c, 5 * i, 0))
            (folder / "notes.txt").write_text("not an image")
    return root


# ----------------------------------------------------------------------------- helpers


def check_splits(splits: DataSplits, size: int, num_classes: int):
    assert splits.image_size == size and splits.num_classes == num_classes == len(splits.classes)
    for view in (splits.train, splits.train_augmented, splits.val, splits.test):
        if len(view) == 0:
            continue
        image, label = view[0]
        assert image.shape == (3, size, size) and image.dtype == torch.uint8
        assert type(label) is int and 0 <= label < num_classes
    assert torch.equal(splits.train.indices, splits.train_augmented.indices)


def check_disjoint_cover(splits: DataSplits, n_train: int):
    train, val = set(splits.train.indices.tolist()), set(splits.val.indices.tolist())
    assert not train & val
    assert train | val == set(range(n_train))


# ----------------------------------------------------------------------------- loaders


def test_digits_offline(offline):
    splits = load_dataset("digits")
    check_splits(splits, 32, 10)
    assert splits.classes == [str(i) for i in range(10)]
    # 1797 samples: a fixed 20% test split (359), then 10% of the rest (144) as val.
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1294, 144, 359)
    train, val, test = (set(v.indices.tolist()) for v in (splits.train, splits.val, splits.test))
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(range(1797))
    # Grayscale is repeated on all three channels.
    image, _ = splits.test[3]
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    # The test split does not move with the run seed; val does.
    other = load_dataset("digits", seed=5)
    assert torch.equal(other.test.indices, splits.test.indices)
    assert not torch.equal(other.val.indices, splits.val.indices)
    # Stratified: every class within one sample of its share.
    counts = torch.bincount(splits.test.labels, minlength=10)
    assert (counts.max() - counts.min()) <= 2


def test_cifar10_reads_python_pickles(tmp_path, offline, monkeypatch):
    import torchvision.datasets

    def no_torchvision_reader(*args, **kwargs):
        raise AssertionError("torchvision's CIFAR10 must not read (it checks md5)")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_torchvision_reader)
    train_pixels, train_labels, test_pixels, test_labels = write_cifar10(tmp_path)
    splits = load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.2)
    check_splits(splits, 32, 10)
    assert splits.classes[0] == "airplane" and splits.classes[-1] == "truck"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 7)
    check_disjoint_cover(splits, 30)
    for view, pixels, labels in ((splits.train, train_pixels, train_labels), (splits.test, test_pixels, test_labels)):
        for i in range(len(view)):
            j = int(view.indices[i])
            image, label = view[i]
            assert label == labels[j]
            # Channel-major rows: 1024 red, then green, then blue.
            assert torch.equal(image, torch.from_numpy(pixels[j].reshape(3, 32, 32)))
    assert torch.equal(splits.val.labels, torch.tensor(train_labels)[splits.val.indices])

    # The named folder itself is accepted as data_dir, and images are resized on request.
    resized = load_dataset("cifar-10", data_dir=tmp_path / "cifar-10-batches-py", image_size=48)
    check_splits(resized, 48, 10)


def test_cifar100_fine_labels(tmp_path, offline):
    train_pixels, train_labels, test_pixels, test_labels = write_cifar100(tmp_path)
    splits = load_dataset("cifar100", data_dir=str(tmp_path), image_size=16, val_fraction=0.25, stratify=False)
    check_splits(splits, 16, 100)
    assert splits.classes[7] == "class007"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 5)
    check_disjoint_cover(splits, 20)
    assert [splits.test[i][1] for i in range(5)] == test_labels
    assert splits.train.labels.tolist() == [train_labels[j] for j in splits.train.indices.tolist()]


def test_tiny_imagenet_layout(tmp_path, offline):
    write_tiny_imagenet(tmp_path)
    splits = load_dataset("tiny-imagenet", data_dir=tmp_path, val_fraction=0.25)
    check_splits(splits, 64, 3)
    assert splits.class_ids == ["n01", "n02", "n03"]  # sorted, as ImageFolder orders wnids
    assert splits.classes == ["goldfish, Carassius auratus", "shark", "hen"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 4)
    check_disjoint_cover(splits, 12)
    assert splits.test.labels.tolist() == [2, 0, 1, 0]  # from val_annotations.txt
    # Grayscale JPEG comes back with three channels; the train label follows its folder.
    paths = [splits.train.source.paths[j] for j in splits.train.indices.tolist()]
    grayscale = next(i for i, path in enumerate(paths) if path.endswith("n03_0.JPEG"))
    image, label = splits.train[grayscale]
    assert image.shape == (3, 64, 64) and label == 2
    small = load_dataset("tiny-imagenet", data_dir=tmp_path / "tiny-imagenet-200", image_size=24)
    check_splits(small, 24, 3)
    assert small.train_augmented[0][0].shape == (3, 24, 24)


@pytest.mark.parametrize("test_name", ["test", "val"])
def test_imagefolder(tmp_path, offline, test_name):
    write_imagefolder(tmp_path, test_name)
    splits = load_dataset("imagefolder", data_dir=tmp_path, image_size=16, val_fraction=0.2)
    check_splits(splits, 16, 2)
    assert splits.classes == ["cat", "dog"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 4)
    assert torch.bincount(splits.val.labels).tolist() == [1, 1]  # stratified
    check_disjoint_cover(splits, 10)
    images, labels = splits.test.as_tensors()
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 0, 1, 1]
    # The colour written for "cat" (red 100) survives decoding and resizing.
    assert abs(float(images[0, 0].float().mean()) - 100) <= 2
    assert float(images[2, 0].float().mean()) <= 2


def test_imagefolder_leaves_out_hidden_and_linked_twice_and_refuses_leaks(tmp_path, offline):
    """What an outside review found silently shifting labels or counting images twice: a hidden folder
    (.ipynb_checkpoints) became a class, macOS "._name.png" files were read, an empty class folder became a class,
    a link back to its own folder grew a class 40-fold, and a link from train into test trained on test images."""
    import os
    import unicodedata

    write_imagefolder(tmp_path)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "train" / "cat" / "._0.png").write_bytes(b"\0\5\x16\7")  # AppleDouble, no image
    os.symlink(".", tmp_path / "train" / "cat" / "again")  # a loop
    os.symlink(tmp_path / "train" / "dog" / "0.png", tmp_path / "train" / "dog" / "same.png")  # the same file
    splits = load_dataset("imagefolder", data_dir=tmp_path, image_size=16, val_fraction=0.2)
    assert splits.classes == ["cat", "dog"] and len(splits.train) + len(splits.val) == 10
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: a class folder without images .* remove it or add its images"):
        load_dataset("imagefolder", data_dir=tmp_path, image_size=16)
    (tmp_path / "train" / "empty").rmdir()
    os.symlink(tmp_path / "train" / "cat", tmp_path / "test" / "cat" / "from_train")
    with pytest.raises(ValueError, match=r"test: 5 of its images are files .*train also holds \(through links\): "
                                         r"test images must not be trained on"):
        load_dataset("imagefolder", data_dir=tmp_path, image_size=16)
    os.remove(tmp_path / "test" / "cat" / "from_train")
    os.symlink(tmp_path / "train" / "cat", tmp_path / "train" / "kitten")  # a second class of the same files
    with pytest.raises(ValueError, match=r"kitten: a class folder without images .* of its own: its 5 are files an "
                                         r"earlier class folder holds \(through links\)"):
        load_dataset("imagefolder", data_dir=tmp_path, image_size=16)
    os.remove(tmp_path / "train" / "kitten")
    nfd = unicodedata.normalize("NFD", "café")
    (tmp_path / "train" / "café").mkdir()
    _image(tmp_path / "train" / "café" / "0.png", (8, 8), (0, 0, 200))
    (tmp_path / "test" / nfd).mkdir()
    with pytest.raises(ValueError, match="differ from a train folder only in their Unicode normalization"):
        load_dataset("imagefolder", data_dir=tmp_path, image_size=16)


def test_synthetic_deterministic_any_size():
    a = load_dataset("synthetic", image_size=13, synthetic_samples=40, synthetic_classes=7, seed=3)
    b = load_dataset("synthetic", image_size=13, synthetic_samples=40, synthetic_classes=7, seed=3)
    c = load_dataset("synthetic", image_size=13, synthetic_samples=40, synthetic_classes=7, seed=4)
    check_splits(a, 13, 7)
    assert (len(a.train), len(a.val), len(a.test)) == (36, 4, 8)
    check_disjoint_cover(a, 40)
    ia, la = a.train.as_tensors()
    ib, lb = b.train.as_tensors()
    assert torch.equal(ia, ib) and torch.equal(la, lb)
    assert not torch.equal(ia, c.train.as_tensors()[0])
    assert a.classes == [f"class_{i}" for i in range(7)]


def test_limit_caps_each_split():
    splits = load_dataset("digits", limit=50)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (50, 50, 50)
    assert not set(splits.train.indices.tolist()) & set(splits.val.indices.tolist())
    assert torch.bincount(splits.train.labels, minlength=10).min() >= 4  # stratified subset


def test_val_fraction_zero_gives_empty_val():
    splits = load_dataset("synthetic", synthetic_samples=20, val_fraction=0)
    assert len(splits.val) == 0 and len(splits.train) == 20
    assert splits.val.as_tensors()[0].shape == (0, 3, 32, 32)


# ----------------------------------------------------------------------------- transforms


def test_augmentation_reproducible_and_differs_from_test_view():
    splits = load_dataset("synthetic", image_size=32, synthetic_samples=16)
    torch.manual_seed(123)
    first = [splits.train_augmented[i][0] for i in range(8)]
    torch.manual_seed(123)
    second = [splits.train_augmented[i][0] for i in range(8)]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    plain = [splits.train[i][0] for i in range(8)]
    assert not all(torch.equal(x, y) for x, y in zip(first, plain))
    assert all(x.shape == (3, 32, 32) and x.dtype == torch.uint8 for x in first)
    assert augmentation_resize_size(224) == 252 and augmentation_resize_size(32) == 36


def test_augmentation_is_a_crop_and_flip_of_the_resized_image():
    splits = load_dataset("synthetic", image_size=32, synthetic_samples=4)
    source = splits.train.source
    j = int(splits.train.indices[0])
    resized = source.image(j, 36)
    candidates = [resized[:, t : t + 32, left : left + 32] for t in range(5) for left in range(5)]
    candidates += [c.flip(-1) for c in candidates]
    for _ in range(10):
        out, _ = splits.train_augmented[0]
        assert any(torch.equal(out, c) for c in candidates)


def test_augment_batch_matches_per_image_crops():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    out = augment_batch(images, 32, generator=torch.Generator().manual_seed(0))
    again = augment_batch(images, 32, generator=torch.Generator().manual_seed(0))
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.uint8 and torch.equal(out, again)
    resized = data.resize_batch(images, 36)
    for b in range(6):
        candidates = [resized[b, :, t : t + 32, left : left + 32] for t in range(5) for left in range(5)]
        assert any(torch.equal(out[b], c) or torch.equal(out[b], c.flip(-1)) for c in candidates)


# ----------------------------------------------------------------------------- loaders


def _epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_make_loader_reproducible_in_process():
    splits = load_dataset("synthetic", image_size=16, synthetic_samples=40)
    loader = make_loader(splits.train_augmented, 8, shuffle=True, seed=5)
    torch.manual_seed(0)
    a = _epoch(loader)
    torch.manual_seed(0)
    b = _epoch(make_loader(splits.train_augmented, 8, shuffle=True, seed=5))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    c = _epoch(make_loader(splits.train_augmented, 8, shuffle=True, seed=6))
    assert not all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(a, c))
    assert sum(len(y) for _, y in a) == len(splits.train)
    dropped = make_loader(splits.train, 16, shuffle=False, drop_last=True)
    assert [len(y) for _, y in dropped] == [16, 16]


def test_make_loader_reproducible_with_workers():
    splits = load_dataset("synthetic", image_size=16, synthetic_samples=24)
    runs = []
    for _ in range(2):
        torch.manual_seed(99)  # must not matter: workers are seeded from the loader's seed
        runs.append(_epoch(make_loader(splits.train_augmented, 6, shuffle=True, num_workers=2, seed=1)))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(*runs))


def test_make_loader_with_sampler():
    splits = load_dataset("synthetic", image_size=8, synthetic_samples=10, val_fraction=0)
    order = [9, 0, 3]
    loader = make_loader(splits.train, 3, shuffle=False, sampler=order)
    (_, labels), = list(loader)
    assert labels.tolist() == [splits.train[i][1] for i in order]
    with pytest.raises(ValueError, match="shuffle"):
        make_loader(splits.train, 3, shuffle=True, sampler=order)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(splits.train, 0, shuffle=False)


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=1, max_size=60),
    fraction=st.floats(0, 0.99),
    seed=st.integers(0, 2**31 - 1),
)
def test_stratified_split_property(labels, fraction, seed):
    labels = torch.tensor(labels)
    kept, held = data._split(labels, fraction, seed, stratify=True)
    n = labels.numel()
    assert held.numel() == int(np.floor(fraction * n + 0.5))
    assert sorted(kept.tolist() + held.tolist()) == list(range(n))
    for cls in labels.unique().tolist():
        share = (labels == cls).sum().item() * held.numel() / n
        assert abs((labels[held] == cls).sum().item() - share) < 1


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "name, folder, layout_word",
    [
        ("cifar10", "cifar-10-batches-py", "data_batch_1"),
        ("cifar100", "cifar-100-python", "fine"),
        ("tiny-imagenet", "tiny-imagenet-200", "val_annotations.txt"),
        ("imagefolder", "", "train/<class>"),
    ],
)
def test_missing_data_names_dir_and_layout(tmp_path, offline, name, folder, layout_word):
    if name == "cifar100":
        layout_word = "meta"
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(name, data_dir=tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / folder).rstrip("/") in message
    assert layout_word in message
    if name != "imagefolder":
        assert "download=True" in message


def test_partial_cifar_names_missing_files(tmp_path, offline):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_download_goes_through_torchvision_then_reads_pickles(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def fake_download(root, train, download):
        calls.append((root, download))
        write_cifar10(tmp_path)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_download)
    splits = load_dataset("cifar10", data_dir=tmp_path, download=True)
    assert calls == [(str(tmp_path), True)] and len(splits.test) == 7
    load_dataset("cifar10", data_dir=tmp_path, download=True)  # present: no second download
    assert len(calls) == 1


def test_download_failure_offline_is_file_not_found(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline_download(root, train, download):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline_download)
    with pytest.raises(FileNotFoundError, match="download of cifar100"):
        load_dataset("cifar100", data_dir=tmp_path, download=True)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError) as info:
        load_dataset("mnist")
    assert "name" in str(info.value) and all(n in str(info.value) for n in DATASETS)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, "0.1"])
def test_bad_val_fraction(fraction):
    with pytest.raises(ValueError, match=r"val_fraction.*\[0, 1\)"):
        load_dataset("synthetic", val_fraction=fraction)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(image_size=0), "image_size"),
        (dict(image_size=2.5), "image_size"),
        (dict(limit=0), "limit"),
        (dict(synthetic_samples=0), "synthetic_samples"),
        (dict(synthetic_classes=0), "synthetic_classes"),
    ],
)
def test_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        load_dataset("synthetic", **kwargs)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "tiny-imagenet", "imagefolder"])
def test_data_dir_required(name):
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset(name)


# ----------------------------------------------------------------------------- a user's datasets


def test_dataset_splits_of_one_tensor_dataset():
    from torch.utils.data import TensorDataset

    from vpns_fast.data import dataset_splits

    labels = torch.arange(100) % 4
    images = torch.rand(100, 1, 10, 10)  # float in [0, 1], one channel
    splits = dataset_splits(TensorDataset(images, labels), num_classes=4, image_size=12, val_fraction=0.1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (72, 8, 20)
    seen = [set(view.indices.tolist()) for view in (splits.train, splits.val, splits.test)]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert torch.bincount(labels[splits.test.indices]).tolist() == [5, 5, 5, 5]  # stratified: labels are known
    image, label = splits.train_augmented[0]
    assert image.shape == (3, 12, 12) and image.dtype == torch.float32 and isinstance(label, int)
    assert splits.train[0][0].shape == (3, 12, 12)
    capped = dataset_splits(TensorDataset(images, labels), num_classes=4, image_size=12, limit=5)
    assert max(len(capped.train), len(capped.val), len(capped.test)) == 5


def test_dataset_splits_with_given_val_and_test_and_bad_items():
    from torch.utils.data import TensorDataset

    from vpns_fast.data import dataset_splits

    def data(n):
        return TensorDataset(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8), torch.arange(n) % 2)

    splits = dataset_splits(data(10), data(4), data(6), num_classes=2, image_size=8)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 4, 6)
    assert splits.test[0][0].dtype == torch.uint8
    with pytest.raises(ValueError, match=r"dataset item 0: expected an \(image, label\) pair"):
        dataset_splits(TensorDataset(torch.rand(4, 8, 8), torch.zeros(4, dtype=torch.long)), num_classes=2,
                       image_size=8)
    with pytest.raises(ValueError, match=r"label an integer in \[0, 2\)"):
        dataset_splits(TensorDataset(torch.rand(4, 3, 8, 8), torch.full((4,), 5)), num_classes=2, image_size=8)
    with pytest.raises(ValueError, match="num_classes: expected an integer >= 1"):
        dataset_splits(data(4), num_classes=0, image_size=8)


def test_float_images_outside_zero_to_one_are_refused_by_item():
    """A 0..255 image given as float trained on inputs 255 times too large without a word (an outside review):
    float items must lie in [0, 1] as deploy() requires, NaN refused by the item rather than as a diverged loss."""
    from torch.utils.data import TensorDataset

    from vpns_fast.data import dataset_splits

    labels = torch.arange(4) % 2
    for images, message in ((1 + 254 * torch.rand(4, 3, 8, 8), r"dataset item 0: float pixels must lie in \[0, 1\], "
                             r"got values in \[[0-9.]+, [0-9.]+\] \(0..255 images: pass them as uint8, or divide by "
                             r"255; images already normalized"),
                            (torch.full((4, 3, 8, 8), float("nan")), "dataset item 0: NaN or Inf pixels")):
        with pytest.raises(ValueError, match=message):
            dataset_splits(TensorDataset(images, labels), num_classes=2, image_size=8)
    late = torch.rand(4, 3, 8, 8)
    late[3] *= 255  # one bad item past the first: refused when a loader reads it
    splits = dataset_splits(TensorDataset(late, labels), num_classes=2, image_size=8, val_fraction=0.0,
                            test_fraction=0.0)
    with pytest.raises(ValueError, match="dataset item 3: float pixels must lie in"):
        [splits.train[i] for i in range(len(splits.train))]
    images = torch.rand(4, 3, 8, 8) * 1.05 - 0.02  # a resize's ringing past the ends is within the slack
    assert dataset_splits(TensorDataset(images, labels), num_classes=2, image_size=8).train[0][0].shape == (3, 8, 8)


# --------------------------------------------------------------------------- decoding every image mode

def _gradient16() -> np.ndarray:
    return np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    gray = _gradient16()
    Image.fromarray(gray).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode.startswith("I")
    image = data.decode_image(str(tmp_path / "g.png"))
    expected = torch.from_numpy(((gray.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8))
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert torch.equal(image, expected.expand(3, -1, -1))
    assert (image == 255).float().mean() < 0.01  # PIL's RGB conversion left 99.6% white


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    values = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    image = data.decode_image(str(tmp_path / "f.tif"))
    assert torch.equal(image[0], torch.from_numpy(np.rint(values * 255).astype(np.uint8)))
    assert torch.equal(image[1], image[0]) and torch.equal(image[2], image[0])


@pytest.mark.parametrize("values, message", [
    (np.full((8, 8), 200.0, np.float32), r"mode F\) must hold values in \[0, 1\]"),
    (np.full((8, 8), np.nan, np.float32), "NaN or Inf"),
    (np.full((8, 8), 70000, np.int32), "mode I"),
])
def test_images_of_unknown_range_are_refused(tmp_path, values, message):
    Image.fromarray(values).save(tmp_path / "x.tif")
    with pytest.raises(ValueError, match=message) as info:
        data.decode_image(str(tmp_path / "x.tif"))
    assert "x.tif" in str(info.value)


def test_eight_bit_modes_decode_as_before(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    for mode in ("RGB", "L", "RGBA", "P", "1", "CMYK", "LA"):
        path = tmp_path / f"x_{mode}.{'png' if mode != 'CMYK' else 'tif'}"
        base.convert(mode).save(path)
        with Image.open(path) as pil:
            expected = torch.from_numpy(np.asarray(pil.convert("RGB")).copy()).permute(2, 0, 1)
        assert torch.equal(data.decode_image(str(path)), expected), mode


def test_a_non_image_file_names_the_file(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png: not an image file"):
        data.decode_image(str(tmp_path / "notes.png"))
