"""Datasets, partitions among workers, per-worker loaders and augmentation.

    loader = split(dataset, workers=16, batch_size=64, partition="iid", seed=666)  # any Dataset
    x, y = next(loader)                                             # (16, 64, ...), (16, 64)

or, piece by piece for tensors in memory:

    ds = load_dataset("cifar10", "/data/cifar", image_size=56)      # Dataset, x (N, 3, 56, 56)
    parts = iid(len(ds.y_train), m=16, seed=666)                    # 16 index tensors
    loader = WorkerLoader(ds.x_train, ds.y_train, parts, 64, seed=666, augment=crop_flip)
    x, y = loader.next_batch()                                      # (16, 64, 3, 56, 56), (16, 64)
    for xb, yb in batches(ds.x_test, ds.y_test, 1000): ...          # evaluation
"""

from dsgd.data.augment import crop_at, crop_flip, random_crop, random_flip
from dsgd.data.dataset import Dataset, batches, resize
from dsgd.data.loader import IndexSampler, WorkerLoader
from dsgd.data.partition import PARTITIONS, dirichlet, iid, partition, shards
from dsgd.data.readers import (
    read_cifar10,
    read_cifar100,
    read_fashion_mnist,
    read_idx,
    read_tiny_imagenet,
)
from dsgd.data.registry import DATASETS, as_dataset, load_dataset, make_mnist1d, make_synthetic
from dsgd.data.split import DatasetLoader, labels_of, split

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "Dataset",
    "DatasetLoader",
    "IndexSampler",
    "WorkerLoader",
    "as_dataset",
    "batches",
    "crop_at",
    "crop_flip",
    "dirichlet",
    "iid",
    "labels_of",
    "load_dataset",
    "make_mnist1d",
    "make_synthetic",
    "partition",
    "random_crop",
    "random_flip",
    "read_cifar10",
    "read_cifar100",
    "read_fashion_mnist",
    "read_idx",
    "read_tiny_imagenet",
    "resize",
    "shards",
    "split",
]
