"""Datasets, partitions among workers, per-worker loaders and augmentation.

    ds = load_dataset("cifar10", "/data/cifar", image_size=56)      # Dataset, x (N, 3, 56, 56)
    parts = iid(len(ds.y_train), m=16, seed=666)                    # 16 index tensors
    loader = WorkerLoader(ds.x_train, ds.y_train, parts, 64, seed=666, augment=crop_flip)
    x, y = loader.next_batch()                                      # (16, 64, 3, 56, 56), (16, 64)
    for xb, yb in batches(ds.x_test, ds.y_test, 1000): ...          # evaluation
"""

from dsgd.data.augment import crop_at, crop_flip, random_crop, random_flip
from dsgd.data.dataset import Dataset, batches, resize
from dsgd.data.loader import WorkerLoader
from dsgd.data.partition import dirichlet, iid
from dsgd.data.readers import (
    read_cifar10,
    read_cifar100,
    read_fashion_mnist,
    read_idx,
    read_tiny_imagenet,
)
from dsgd.data.registry import DATASETS, load_dataset, make_mnist1d, make_synthetic

__all__ = [
    "DATASETS",
    "Dataset",
    "WorkerLoader",
    "batches",
    "crop_at",
    "crop_flip",
    "dirichlet",
    "iid",
    "load_dataset",
    "make_mnist1d",
    "make_synthetic",
    "random_crop",
    "random_flip",
    "read_cifar10",
    "read_cifar100",
    "read_fashion_mnist",
    "read_idx",
    "read_tiny_imagenet",
    "resize",
]
