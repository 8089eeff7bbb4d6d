"""Datasets by name: `load_dataset("cifar10", "/data/cifar", n_train=1000, image_size=56)`.

Two datasets are generated rather than read: "mnist1d" (Greydanus 2020, via the `mnist1d`
package, no download) and "synthetic" (seeded Gaussian clusters, for tests and benchmarks).

A name ``"package.module:factory"`` (``data.name`` in a config, see ``dsgd.importing``) names
the user's own function returning ``(train, test)``: two map-style Datasets (``ds[i] ->
(x, y)``) or two ``(x, y)`` tensor pairs, or a ``dsgd.data.Dataset``. Its options are passed as
keyword arguments (``data_dir=`` too, when it names that parameter and ``data.dir`` is set),
and the result is read into memory by ``as_dataset``.
"""

from __future__ import annotations

import inspect
import os
import random
from collections.abc import Callable

import numpy as np
import torch

from dsgd.data.dataset import Dataset, first, resize
from dsgd.data.readers import read_cifar10, read_cifar100, read_fashion_mnist, read_tiny_imagenet
from dsgd.errors import UserError
from dsgd.importing import call_imported, is_import_name


def make_synthetic(
    *,
    n_train: int = 2048,
    n_test: int = 512,
    num_classes: int = 10,
    shape: tuple[int, ...] = (3, 8, 8),
    separation: float = 3.0,
    seed: int = 0,
    image_size: int | None = None,
) -> Dataset:
    """Gaussian clusters: class c has mean mu_c ~ N(0, (separation^2 / D) I), D = prod(shape),
    and a sample is mu_y + N(0, I). The expected distance between two class means is
    separation * sqrt(2) whatever D is, so difficulty does not change with the shape.

    Labels are balanced (i mod num_classes, shuffled). Train and test come from one seeded
    generator. Returns x as (N, *shape) float32, y as (N,) int64.
    """
    if num_classes < 2 or n_train < 1 or n_test < 1:
        raise UserError(
            f"synthetic needs num_classes >= 2, n_train >= 1, n_test >= 1; got {num_classes}, "
            f"{n_train}, {n_test}"
        )
    shape = tuple(int(s) for s in shape)
    g = torch.Generator().manual_seed(seed)
    dim = int(np.prod(shape))
    means = torch.randn(num_classes, dim, generator=g) * (separation / dim**0.5)  # (K, D)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]  # (n,)
        x = means[y] + torch.randn(n, dim, generator=g)  # (n, D)
        return x.view(n, *shape), y

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    if image_size is not None:
        x_train, x_test = resize(x_train, image_size), resize(x_test, image_size)
    return Dataset(x_train, y_train, x_test, y_test, num_classes, "synthetic")


def make_mnist1d(
    *,
    num_samples: int = 5000,
    seed: int = 42,
    n_train: int | None = None,
    n_test: int | None = None,
) -> Dataset:
    """MNIST-1D generated locally with the `mnist1d` package's default arguments (80/20 split).

    `make_dataset` standardizes the whole set to mean 0, std 1; that is kept. It reseeds
    Python's and NumPy's global generators, so their states are restored afterwards.
    Returns x as (N, 1, 40) float32 (one channel, for Conv1d; flatten for an MLP), y as
    (N,) int64, 10 classes. The defaults give 4000 train / 1000 test samples.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise UserError(
            f"cannot import mnist1d ({e}); pip install mnist1d (or pip install 'dsgd[mnist1d]')"
        ) from None
    args = get_dataset_args()
    args.num_samples, args.seed = int(num_samples), int(seed)
    if args.num_samples < 10:
        raise UserError(f"mnist1d needs num_samples >= 10 (one per class), got {num_samples}")
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)  # never get_dataset(): it tries to download
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    k_train = first(n_train, "n_train", len(d["y"]))
    k_test = first(n_test, "n_test", len(d["y_test"]))

    def as_x(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.float32)).unsqueeze(1)  # (N, 1, 40)

    def as_y(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.int64))

    return Dataset(
        as_x(d["x"][:k_train]), as_y(d["y"][:k_train]),
        as_x(d["x_test"][:k_test]), as_y(d["y_test"][:k_test]),
        10, "mnist1d",
    )


# name -> (loader, whether it reads files)
DATASETS: dict[str, tuple[Callable[..., Dataset], bool]] = {
    "fashion-mnist": (read_fashion_mnist, True),
    "mnist1d": (make_mnist1d, False),
    "cifar10": (read_cifar10, True),
    "cifar100": (read_cifar100, True),
    "tiny-imagenet": (read_tiny_imagenet, True),
    "synthetic": (make_synthetic, False),
}

DEFAULT_ROOT = "/usr/share/datasets"  # data_dir defaults to DEFAULT_ROOT/<name>


def load_dataset(
    name: str,
    data_dir: str | None = None,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    image_size: int | None = None,
    **kw,
) -> Dataset:
    """Load a dataset by name; see DATASETS for the names.

    data_dir: where a file-based dataset lives (default /usr/share/datasets/<name>); ignored by
    the generated ones. n_train / n_test: keep only the first N samples (for quick runs).
    image_size: resize images to image_size x image_size (the paper trains CIFAR at 56).
    Other keywords go to the dataset (e.g. seed, num_samples for mnist1d; shape, num_classes,
    seed for synthetic). Returns a Dataset; x is (N, *sample_shape) float32, y is (N,) int64.
    """
    if is_import_name(name):
        return _load_imported(name, data_dir, n_train, n_test, image_size, kw)
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    loader, reads_files = DATASETS[name]
    options = {"n_train": n_train, "n_test": n_test, "image_size": image_size}
    options = {k: v for k, v in options.items() if v is not None} | kw
    accepted = [p for p in inspect.signature(loader).parameters if p != "data_dir"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UserError(
            f"dataset {name!r} does not take {', '.join(unknown)}; it takes {', '.join(accepted)}"
        )
    if not reads_files:
        return loader(**options)
    data_dir = data_dir if data_dir is not None else os.path.join(DEFAULT_ROOT, name)
    if not os.path.isdir(data_dir):
        raise UserError(f"{name} data directory {data_dir} does not exist; pass --data-dir")
    return loader(data_dir, **options)


def _tensors(split, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as (x (N, *sample_shape), y (N,) int64): a pair of tensors as it is, a
    map-style Dataset read once, in order, 1024 samples at a time."""
    from torch.utils.data import DataLoader, TensorDataset

    if isinstance(split, TensorDataset) and len(split.tensors) == 2:
        split = split.tensors
    if isinstance(split, tuple | list) and len(split) == 2 and all(
            isinstance(t, torch.Tensor) for t in split):
        x, y = split
    elif hasattr(split, "__getitem__") and hasattr(split, "__len__"):
        if len(split) == 0:
            raise UserError(f"the {what} set is empty")
        from dsgd.data.split import collate

        parts = [collate(chunk, 1, len(chunk)) for chunk in
                 DataLoader(split, batch_size=1024, collate_fn=list)]
        x, y = (torch.cat([p[i][0] for p in parts]) for i in (0, 1))
    else:
        raise UserError(f"the {what} set must be a map-style Dataset or (x, y) tensors, got "
                        f"{type(split).__name__}")
    if len(x) != len(y) or y.ndim != 1 or y.is_floating_point():
        raise UserError(f"the {what} set needs x (N, ...) and integer labels y (N,); got "
                        f"{tuple(x.shape)} and {tuple(y.shape)} {y.dtype}")
    return x, y.long()


def as_dataset(obj, name: str) -> Dataset:
    """A ``dsgd.data.Dataset`` from a factory's result: a Dataset as it is, or ``(train,
    test)`` (see the module docstring). ``num_classes`` is ``len(train.classes)`` when the
    train set has ``classes`` (torchvision's name), else the largest label + 1."""
    if isinstance(obj, Dataset):
        return obj
    if not (isinstance(obj, tuple | list) and len(obj) == 2):
        raise UserError(f"data factory {name!r} must return (train, test) Datasets, got "
                        f"{type(obj).__name__}")
    (x_train, y_train), (x_test, y_test) = _tensors(obj[0], "train"), _tensors(obj[1], "test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise UserError(f"data factory {name!r}: train samples are {tuple(x_train.shape[1:])}, "
                        f"test samples {tuple(x_test.shape[1:])}; they must have one shape")
    classes = getattr(obj[0], "classes", None)
    num_classes = len(classes) if classes is not None else int(max(y_train.max(),
                                                                   y_test.max())) + 1
    if int(min(y_train.min(), y_test.min())) < 0 or int(max(y_train.max(),
                                                            y_test.max())) >= num_classes:
        raise UserError(f"data factory {name!r}: labels must lie in [0, {num_classes})")
    return Dataset(x_train, y_train, x_test, y_test, num_classes, name)


def _load_imported(spec: str, data_dir: str | None, n_train: int | None, n_test: int | None,
                   image_size: int | None, options: dict) -> Dataset:
    context = {"data_dir": data_dir} if data_dir is not None else {}
    ds = as_dataset(call_imported(spec, "data.name", "data", options, context), spec)
    k_train = first(n_train, "n_train", len(ds.y_train))
    k_test = first(n_test, "n_test", len(ds.y_test))
    x_train, x_test = ds.x_train[:k_train], ds.x_test[:k_test]
    if image_size is not None:
        x_train, x_test = resize(x_train, image_size), resize(x_test, image_size)
    return Dataset(x_train, ds.y_train[:k_train], x_test, ds.y_test[:k_test], ds.num_classes,
                   ds.name)
