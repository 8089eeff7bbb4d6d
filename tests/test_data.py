"""dsgd.data: readers on fixture files written here, partitions, the per-worker loader and
augmentation, against closed forms and slow references."""

from __future__ import annotations

import gzip
import io
import itertools
import os
import pickle

import numpy as np
import pytest
import torch

from dsgd.data import (
    WorkerLoader,
    batches,
    crop_at,
    crop_flip,
    dirichlet,
    iid,
    load_dataset,
    make_mnist1d,
    random_crop,
    random_flip,
    read_cifar10,
    read_cifar100,
    read_fashion_mnist,
    read_tiny_imagenet,
)
from dsgd.errors import UserError

# ---------------------------------------------------------------------------- helpers


def denormalize(x: torch.Tensor, raw_train: np.ndarray) -> np.ndarray:
    """Invert the per-channel normalization, with statistics recomputed from the raw uint8
    train images (N, C, H, W), and round back to uint8."""
    scaled = raw_train.astype(np.float64) / 255.0
    mean = scaled.mean(axis=(0, 2, 3)).reshape(1, -1, 1, 1)
    std = scaled.std(axis=(0, 2, 3)).reshape(1, -1, 1, 1)
    return np.round((x.double().numpy() * std + mean) * 255.0).astype(np.uint8)


def write_idx(path: str, array: np.ndarray, magic: int | None = None) -> None:
    """An unsigned-byte IDX file: magic (0, 0, 0x08, ndim), big-endian int32 dims, data."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw += array.astype(np.uint8).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(raw)


def write_fashion(folder: str, gz: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (7, 5, 6), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 7, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 5, 6), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 3, dtype=np.uint8),
    }
    os.makedirs(folder, exist_ok=True)
    for stem, a in arrays.items():
        write_idx(os.path.join(folder, stem + (".gz" if gz else "")), a)
    return arrays


def write_pickle(path: str, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


# ---------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_round_trip(tmp_path, gz):
    a = write_fashion(str(tmp_path), gz, np.random.default_rng(0))
    ds = load_dataset("fashion-mnist", str(tmp_path))
    assert ds.x_train.shape == (7, 1, 5, 6) and ds.x_train.dtype == torch.float32
    assert ds.x_test.shape == (3, 1, 5, 6) and ds.num_classes == 10
    assert ds.y_train.dtype == torch.int64
    raw_train = a["train-images-idx3-ubyte"][:, None]
    np.testing.assert_array_equal(denormalize(ds.x_train, raw_train), raw_train)
    np.testing.assert_array_equal(
        denormalize(ds.x_test, raw_train), a["t10k-images-idx3-ubyte"][:, None]
    )
    np.testing.assert_array_equal(ds.y_train.numpy(), a["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.y_test.numpy(), a["t10k-labels-idx1-ubyte"])
    # Normalized with full-train statistics: mean 0, std 1 on the train set.
    assert abs(ds.x_train.mean().item()) < 1e-5
    assert abs(ds.x_train.std(unbiased=False).item() - 1) < 1e-5


def test_fashion_mnist_subset_keeps_full_statistics(tmp_path):
    write_fashion(str(tmp_path), True, np.random.default_rng(1))
    full = read_fashion_mnist(str(tmp_path))
    part = read_fashion_mnist(str(tmp_path), n_train=4, n_test=2)
    assert part.x_train.shape == (4, 1, 5, 6) and part.x_test.shape == (2, 1, 5, 6)
    assert torch.equal(part.x_train, full.x_train[:4])
    assert torch.equal(part.y_test, full.y_test[:2])
    with pytest.raises(UserError, match="n_train"):
        read_fashion_mnist(str(tmp_path), n_train=8)


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("fashion-mnist", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="train-images-idx3-ubyte"):
        load_dataset("fashion-mnist", str(tmp_path))  # exists, but empty
    write_fashion(str(tmp_path), False, np.random.default_rng(2))
    write_idx(str(tmp_path / "t10k-images-idx3-ubyte"), np.zeros((3, 5, 6)), magic=0x0801)
    with pytest.raises(UserError, match="magic number 2049, expected 2051") as err:
        load_dataset("fashion-mnist", str(tmp_path))
    assert "\n" not in str(err.value)
    path = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(str(path), np.zeros((3, 5, 6)))
    path.write_bytes(path.read_bytes()[:-1])  # truncated
    with pytest.raises(UserError, match="truncated"):
        load_dataset("fashion-mnist", str(tmp_path))


REAL_FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(REAL_FMNIST), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist():
    ds = load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10


# ---------------------------------------------------------------------------- CIFAR


def cifar_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3072) uint8 rows whose red plane is < 85, green in [85, 170), blue >= 170, so a
    wrong channel order cannot pass."""
    planes = [rng.integers(lo, lo + 85, (n, 1024), dtype=np.uint8) for lo in (0, 85, 170)]
    return np.concatenate(planes, axis=1)


@pytest.mark.parametrize("nested", [False, True])
def test_cifar10_layout(tmp_path, nested):
    rng = np.random.default_rng(3)
    root = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    root.mkdir(exist_ok=True)
    rows, labels = [], []
    for i in range(1, 6):
        r, y = cifar_rows(rng, 2), rng.integers(0, 10, 2).tolist()
        write_pickle(str(root / f"data_batch_{i}"), {b"data": r, b"labels": y})
        rows.append(r)
        labels += y
    test_rows, test_labels = cifar_rows(rng, 3), [9, 0, 4]
    write_pickle(str(root / "test_batch"), {b"data": test_rows, b"labels": test_labels})
    write_pickle(str(root / "batches.meta"), {b"label_names": [b"x"] * 10})

    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.num_classes == 10
    raw = np.concatenate(rows)
    chw = np.stack([raw[:, :1024], raw[:, 1024:2048], raw[:, 2048:]], 1).reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(denormalize(ds.x_train, chw), chw)
    assert chw[3, 0, 1, 2] == raw[3, 32 + 2]  # red pixel (row 1, column 2)
    assert ds.y_train.tolist() == labels and ds.y_test.tolist() == test_labels
    test_chw = test_rows.reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(denormalize(ds.x_test, chw), test_chw)


def test_cifar100_and_resize(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    train, test = cifar_rows(rng, 6), cifar_rows(rng, 2)
    fine = [0, 99, 50, 7, 7, 1]
    train_dict = {b"data": train, b"fine_labels": fine, b"coarse_labels": [0] * 6}
    write_pickle(str(root / "train"), train_dict)
    write_pickle(str(root / "test"), {b"data": test, b"fine_labels": [98, 3]})
    write_pickle(str(root / "meta"), {b"fine_label_names": [b"x"] * 100})
    ds = read_cifar100(str(tmp_path))
    assert ds.num_classes == 100 and ds.y_train.tolist() == fine
    np.testing.assert_array_equal(
        denormalize(ds.x_train, train.reshape(-1, 3, 32, 32)), train.reshape(-1, 3, 32, 32)
    )
    big = load_dataset("cifar100", str(tmp_path), image_size=56, n_test=1)
    assert big.x_train.shape == (6, 3, 56, 56) and big.x_test.shape == (1, 3, 56, 56)


def test_cifar_errors(tmp_path):
    with pytest.raises(UserError, match="data_batch_1") as err:
        read_cifar10(str(tmp_path))
    assert "\n" not in str(err.value) and "--set data.dir=PATH" in str(err.value)
    bad = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}  # rows of 100, not 3072
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_pickle(str(tmp_path / name), bad)
    with pytest.raises(UserError, match="3072"):
        read_cifar10(str(tmp_path))
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    write_pickle(str(tmp_path / "data_batch_1"), {b"labels": [0, 1]})
    with pytest.raises(UserError, match="b'data'"):
        read_cifar10(str(tmp_path))


# ---------------------------------------------------------------------------- Tiny ImageNet


def test_tiny_imagenet_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(5)
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n09", "n01"]  # not sorted: class index follows sorted order, n01 -> 0
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    pixels = {}
    for w in wnids:
        folder = root / "train" / w / "images"
        folder.mkdir(parents=True)
        for k in range(2):
            a = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(a).save(folder / f"{w}_{k}.png")
            pixels[(w, k)] = a
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)  # grayscale file, decoded to RGB
    Image.fromarray(gray).save(root / "val" / "images" / "val_0.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
        root / "val" / "images" / "val_1.JPEG"
    )
    (root / "val" / "val_annotations.txt").write_text(
        "val_0.png\tn09\t0\t0\t8\t8\nval_1.JPEG\tn01\t0\t0\t8\t8\n"
    )

    ds = load_dataset("tiny-imagenet", str(tmp_path))
    assert ds.num_classes == 2 and ds.x_train.shape == (4, 3, 8, 8)
    # Round-robin over classes: file 0 of n01, file 0 of n09, file 1 of n01, file 1 of n09.
    assert ds.y_train.tolist() == [0, 1, 0, 1] and ds.y_test.tolist() == [1, 0]
    raw = np.stack([pixels[(w, k)] for k in range(2) for w in ("n01", "n09")])
    raw = raw.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(denormalize(ds.x_train, raw), raw)
    np.testing.assert_array_equal(denormalize(ds.x_test[:1], raw)[0], np.stack([gray] * 3))
    small = read_tiny_imagenet(str(root), n_train=2, image_size=4)
    assert small.x_train.shape == (2, 3, 4, 4) and small.y_train.tolist() == [0, 1]
    with pytest.raises(UserError, match="wnids.txt"):
        read_tiny_imagenet(str(tmp_path / "tiny-imagenet-200" / "train"))


# ---------------------------------------------------------------------------- generated sets


def test_mnist1d_shapes_seeded_and_no_global_side_effect():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    ds = make_mnist1d(num_samples=200, seed=7)
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    assert ds.x_train.shape == (160, 1, 40) and ds.x_test.shape == (40, 1, 40)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert set(ds.y_train.tolist()) == set(range(10))
    again = load_dataset("mnist1d", num_samples=200, seed=7, n_train=50)
    assert torch.equal(again.x_train, ds.x_train[:50])


def test_synthetic_and_registry():
    options = dict(n_train=100, n_test=20, shape=(2, 4, 4), num_classes=5, seed=1)
    ds = load_dataset("synthetic", **options)
    assert ds.x_train.shape == (100, 2, 4, 4) and ds.y_test.shape == (20,)
    assert torch.bincount(ds.y_train).tolist() == [20] * 5
    again = load_dataset("synthetic", **options)
    assert torch.equal(ds.x_train, again.x_train)
    flat = load_dataset("synthetic", shape=(32,), seed=1)
    assert flat.x_train.shape == (2048, 32)
    # Clusters are separable: nearest class mean (estimated on train) beats chance by far.
    means = torch.stack([flat.x_train[flat.y_train == c].mean(0) for c in range(10)])
    pred = torch.cdist(flat.x_test, means).argmin(1)
    assert (pred == flat.y_test).float().mean() > 0.5
    with pytest.raises(UserError, match="known: fashion-mnist, mnist1d, cifar10"):
        load_dataset("imagenet")
    with pytest.raises(UserError, match="does not take image_size"):
        load_dataset("mnist1d", image_size=32)
    with pytest.raises(UserError, match="does not take colour"):
        load_dataset("synthetic", colour=True)


def test_batches_cover_in_order():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    got = list(batches(x, y, 4))
    assert [len(b[1]) for b in got] == [4, 4, 2]
    assert torch.cat([b[1] for b in got]).tolist() == list(range(10))


# ---------------------------------------------------------------------------- partitions


def test_iid_partition():
    parts = iid(103, 4, seed=666)
    assert [len(p) for p in parts] == [25] * 4 and all(p.dtype == torch.int64 for p in parts)
    everything = torch.cat(parts)
    assert len(everything.unique()) == 100 and everything.max() < 103
    assert all(torch.equal(a, b) for a, b in zip(parts, iid(103, 4, seed=666), strict=True))
    assert not torch.equal(parts[0], iid(103, 4, seed=667)[0])
    with pytest.raises(UserError):
        iid(3, 4, seed=0)


def mean_label_entropy(parts, labels, k):
    h = []
    for p in parts:
        q = torch.bincount(labels[p], minlength=k).double() / len(p)
        h.append(-(q[q > 0] * q[q > 0].log()).sum())
    return torch.stack(h).mean().item()


def test_dirichlet_partition():
    labels = torch.arange(2000) % 10
    entropies = []
    for alpha in (100.0, 1.0, 0.1):
        parts = dirichlet(labels, 8, alpha, seed=0)
        everything = torch.cat(parts)
        assert len(everything) == 2000 and len(everything.unique()) == 2000  # disjoint, covers
        assert min(len(p) for p in parts) >= 1
        entropies.append(mean_label_entropy(parts, labels, 10))
    assert entropies[0] > entropies[1] > entropies[2]
    assert entropies[0] > 0.95 * np.log(10)  # alpha = 100: nearly iid
    again = dirichlet(labels, 8, 0.1, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    # Extreme skew with many workers: nobody is left empty.
    tiny = dirichlet(torch.arange(60) % 3, 30, 0.01, seed=1)
    assert min(len(p) for p in tiny) >= 1 and len(torch.cat(tiny).unique()) == 60


# ---------------------------------------------------------------------------- WorkerLoader


def index_data(n):
    """x[i] = i, so a batch tells which samples it holds."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n) % 10


def test_loader_shapes_and_shards():
    ds = load_dataset("synthetic", n_train=96, n_test=8, shape=(3, 8, 8))
    parts = iid(96, 4, seed=0)
    loader = WorkerLoader(ds.x_train, ds.y_train, parts, batch_size=8, seed=0, augment=crop_flip)
    x, y = next(loader)
    assert x.shape == (4, 8, 3, 8, 8) and y.shape == (4, 8) and y.dtype == torch.int64

    x, y = index_data(96)
    loader = WorkerLoader(x, y, parts, batch_size=8, seed=0)
    assert loader.steps_per_epoch == 3 and loader.num_workers == 4
    for epoch in range(3):
        seen = [[] for _ in range(4)]
        for xb, yb in itertools.islice(loader, loader.steps_per_epoch):
            idx = xb.view(4, 8).long()
            assert torch.equal(yb, y[idx])
            for j in range(4):
                seen[j].append(idx[j])
        for j in range(4):  # each worker sweeps exactly its own shard once per epoch
            assert torch.equal(torch.cat(seen[j]).sort().values, parts[j].sort().values)
        if epoch == 0:
            first_order = torch.cat(seen[0])
        assert loader.epoch == epoch
    assert not torch.equal(torch.cat(seen[0]), first_order)  # a fresh order each epoch


def test_loader_unequal_shards():
    x, y = index_data(300)
    parts = dirichlet(y, 5, alpha=1.0, seed=3)
    b = min(len(p) for p in parts) // 2
    loader = WorkerLoader(x, y, parts, batch_size=b, seed=1)
    steps = [len(p) // b for p in parts]
    seen = [[] for _ in parts]
    for _ in range(max(steps)):
        idx = loader.next_batch()[0].view(len(parts), b).long()
        for j, row in enumerate(idx):
            seen[j].append(row)
    for j, p in enumerate(parts):
        epoch0 = torch.cat(seen[j][: steps[j]])
        assert len(epoch0.unique()) == len(epoch0) == steps[j] * b  # no repeats in an epoch
        assert torch.isin(torch.cat(seen[j]), p).all()
    with pytest.raises(UserError, match="smallest holds"):
        WorkerLoader(x, y, parts, batch_size=max(len(p) for p in parts) + 1)


def test_loader_resume_is_exact():
    ds = load_dataset("synthetic", n_train=120, n_test=8, shape=(3, 8, 8), seed=2)
    parts = dirichlet(ds.y_train, 3, alpha=0.5, seed=0)

    def make(seed):
        return WorkerLoader(ds.x_train, ds.y_train, parts, 4, seed=seed, augment=crop_flip)

    loader = make(seed=5)
    for _ in range(13):  # past an epoch boundary for some workers
        loader.next_batch()
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)
    expected = [loader.next_batch() for _ in range(20)]

    resumed = make(seed=99)  # the seed is overwritten by the checkpoint
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for (xe, ye), (xr, yr) in zip(expected, (resumed.next_batch() for _ in range(20)), strict=True):
        assert torch.equal(xe, xr) and torch.equal(ye, yr)
    with pytest.raises(UserError, match="checkpoint"):
        WorkerLoader(ds.x_train, ds.y_train, parts, 2).load_state_dict(loader.state_dict())


# ---------------------------------------------------------------------------- augmentation


def pattern(n, c, h, w):
    """Distinct nonzero values: x[n, c, i, j] = n*10^5 + c*10^4 + i*100 + j + 1."""
    n_, c_, i_, j_ = torch.meshgrid(*(torch.arange(s) for s in (n, c, h, w)), indexing="ij")
    return (n_ * 100000 + c_ * 10000 + i_ * 100 + j_ + 1).float()


def window(img, top, left, pad):
    """The closed form, one pixel at a time: img shifted by (top - pad, left - pad), zeros
    where the window leaves the image. img: (C, H, W)."""
    c, h, w = img.shape
    out = torch.zeros_like(img)
    for i in range(h):
        for j in range(w):
            si, sj = i + top - pad, j + left - pad
            if 0 <= si < h and 0 <= sj < w:
                out[:, i, j] = img[:, si, sj]
    return out


def test_crop_at_closed_form():
    x = pattern(5, 2, 6, 6)
    top, left = torch.tensor([0, 4, 2, 1, 3]), torch.tensor([4, 0, 2, 3, 0])
    out = crop_at(x, top, left, pad=2)
    for n in range(5):
        assert torch.equal(out[n], window(x[n], int(top[n]), int(left[n]), 2))


def test_random_crop_is_a_shifted_window():
    x = pattern(2 * 6, 3, 32, 32).view(2, 6, 3, 32, 32)  # (m, B, C, H, W)
    out = random_crop(x, torch.Generator().manual_seed(0), pad=4)
    assert out.shape == x.shape
    offsets = set()
    for img, got in zip(x.view(-1, 3, 32, 32), out.view(-1, 3, 32, 32), strict=True):
        padded = torch.zeros(3, 40, 40)
        padded[:, 4:36, 4:36] = img
        matches = [
            (t, l) for t in range(9) for l in range(9)
            if torch.equal(got, padded[:, t : t + 32, l : l + 32])
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 1  # independent offsets per image


def test_flip_and_determinism():
    x = pattern(16, 3, 5, 7)
    g = torch.Generator()
    assert torch.equal(random_flip(x, g, p=1.0), x.flip(-1))
    assert torch.equal(random_flip(x, g, p=0.0), x)
    out = random_flip(x, g.manual_seed(0))
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)]
    assert all(f or torch.equal(o, i) for f, o, i in zip(flipped, out, x, strict=True))
    assert 0 < sum(flipped) < 16

    a = crop_flip(x, torch.Generator().manual_seed(3))
    b = crop_flip(x, torch.Generator().manual_seed(3))
    c = crop_flip(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
