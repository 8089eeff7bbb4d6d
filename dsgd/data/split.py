"""``split``: any data set, cut among m workers, as one stream of stacked (m, B, ...) batches.

    loader = split(dataset, workers=16, batch_size=64, partition="dirichlet", alpha=0.5, seed=0)
    x, y = next(loader)                       # (16, 64, *sample_shape), (16, 64)
    state = loader.state_dict()               # ... later: loader.load_state_dict(state)

``dataset`` is a map-style ``torch.utils.data.Dataset`` (``len(ds)``, ``ds[i] -> (x, y)``), a
pair of tensors ``(x, y)``, a ``TensorDataset`` of two tensors or a ``dsgd.data.Dataset`` (its
training split). Tensors take the fast path, one gather per step (``WorkerLoader``); any other
Dataset is read sample by sample (``DatasetLoader``), optionally by ``num_workers`` DataLoader
processes that decode ahead while the workers train. Both draw their indices from the same
``IndexSampler``, so the same data in either form gives the same batches for the same seed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset, default_collate

from dsgd.data.dataset import Dataset as InMemory
from dsgd.data.loader import Augment, IndexSampler, WorkerLoader
from dsgd.data.partition import partition as make_partition
from dsgd.errors import UserError


def split(
    dataset,
    workers: int,
    batch_size: int,
    *,
    partition: str = "iid",
    alpha: float = 1.0,
    shards_per_worker: int = 2,
    seed: int = 0,
    augment: Augment | None = None,
    num_workers: int = 0,
    prefetch_factor: int = 2,
) -> WorkerLoader | DatasetLoader:
    """Partition ``dataset`` among ``workers`` and return an endless stream of stacked batches.

    partition: "iid" (a seeded shuffle cut into equal shards, as Zhu et al. 2023), "dirichlet"
        (label skew with concentration ``alpha``, Hsu et al. 2019) or "shards"
        (``shards_per_worker`` label-sorted shards per worker, McMahan et al. 2017).
    batch_size: B per worker; an epoch ends when a worker has no full batch left.
    seed: seeds the partition, the shuffles and the augmentation.
    augment: optional ``f(x, generator)`` on each stacked batch, e.g. ``dsgd.data.crop_flip``.
    num_workers, prefetch_factor: DataLoader processes that read (decode) samples of a
        map-style Dataset ahead; ignored for tensors. Random transforms inside the Dataset are
        the Dataset's own and not part of ``state_dict()``; ``augment`` is.

    Returns a loader with ``next_batch()`` / ``next(loader)`` giving x (m, B, ...) and
    y (m, B), ``steps_per_epoch``, ``epoch``, and ``state_dict()`` / ``load_state_dict()`` that
    continue with exactly the same batches.
    """
    tensors = _as_tensors(dataset)
    if tensors is not None:
        x, y = tensors
        parts = make_partition(partition, len(y), y, workers, alpha=alpha,
                               shards_per_worker=shards_per_worker, seed=seed)
        return WorkerLoader(x, y, parts, batch_size, seed=seed, augment=augment)
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise UserError(f"split needs a map-style Dataset (len(ds) and ds[i] -> (x, y)) or "
                        f"tensors (x, y); got {type(dataset).__name__}")
    parts = make_partition(partition, len(dataset), lambda: labels_of(dataset, num_workers),
                           workers, alpha=alpha, shards_per_worker=shards_per_worker, seed=seed)
    return DatasetLoader(dataset, parts, batch_size, seed=seed, augment=augment,
                         num_workers=num_workers, prefetch_factor=prefetch_factor)


def _as_tensors(data) -> tuple[Tensor, Tensor] | None:
    """(x, y) when the data are tensors in memory, else None."""
    if isinstance(data, InMemory):
        return data.x_train, data.y_train
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return data.tensors[0], data.tensors[1]
    if isinstance(data, tuple | list) and len(data) == 2 and all(
            isinstance(t, Tensor) for t in data):
        if len(data[0]) != len(data[1]):
            raise UserError(f"x and y differ in length: {len(data[0])} vs {len(data[1])}")
        return data[0], data[1]
    return None


def _second(samples: list) -> list:
    return [s[1] for s in samples]


def labels_of(dataset, num_workers: int = 0) -> Tensor:
    """(N,) int64 labels of a map-style Dataset: its ``targets`` (torchvision's name) or
    ``labels`` attribute, else ``dataset[i][1]`` for every i (which reads every sample once)."""
    for name in ("targets", "labels"):
        found = getattr(dataset, name, None)
        if found is not None and len(found) == len(dataset):
            return torch.as_tensor(found, dtype=torch.int64).reshape(-1)
    reader = DataLoader(dataset, batch_size=256, num_workers=num_workers, collate_fn=_second)
    return torch.as_tensor([int(y) for chunk in reader for y in chunk], dtype=torch.int64)


def collate(samples: list, m: int, batch: int) -> tuple[Tensor, Tensor]:
    """m * B samples ``(x, y)`` -> x (m, B, *sample_shape), y (m, B)."""
    first = samples[0]
    what = type(first[0]).__name__ if isinstance(first, tuple | list) else type(first).__name__
    why = ""
    try:
        x, y = default_collate(samples)
    except (TypeError, ValueError, RuntimeError) as e:
        x = y = None
        why = f" ({str(e).splitlines()[0][:120]})"
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
        raise UserError(f"dataset[i] must return (x, y) with x a tensor (or array) of one shape "
                        f"and y a label; got {what}{why}; add a transform such as "
                        "torchvision's ToTensor")
    return x.view(m, batch, *x.shape[1:]), y.view(m, batch)


class _Indices:
    """The batch sampler a DataLoader reads ahead from: each batch's m * B indices, with the
    sampler's state after drawing it queued for when that batch is handed out."""

    def __init__(self, owner: DatasetLoader):
        self.owner = owner

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            idx = self.owner.sampler.next_indices()
            self.owner._pending.append(self.owner.sampler.snapshot())
            yield idx.view(-1).tolist()


class DatasetLoader:
    """Stacked per-worker batches read from a map-style Dataset (see ``split``).

    With ``num_workers > 0`` a DataLoader's processes read samples ahead; ``state_dict()`` is
    the state after the last batch handed out, not after the last one read ahead, so a resume
    continues with the next batch the training loop would have seen.
    """

    def __init__(self, dataset, parts, batch_size: int, *, seed: int = 0,
                 augment: Augment | None = None, num_workers: int = 0, prefetch_factor: int = 2):
        if num_workers < 0:
            raise UserError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.sampler = IndexSampler(parts, batch_size, len(dataset), seed)
        self.batch_size = batch_size
        self.augment = augment
        # augmentation has its own generator: DataLoader read-ahead draws indices early
        self.augment_generator = torch.Generator().manual_seed(seed)
        self.processes, self.prefetch_factor = num_workers, prefetch_factor
        self._reader: Iterator | None = None
        self._pending: deque[dict] = deque()  # sampler states after each batch read ahead
        self._handed: dict | None = None  # the sampler state after the last batch handed out

    num_workers = property(lambda self: self.sampler.num_workers)  # m, as WorkerLoader's
    steps_per_epoch = property(lambda self: self.sampler.steps_per_epoch)
    epoch = property(lambda self: self.sampler.epoch)

    def _read(self) -> tuple[Tensor, Tensor]:
        m, b = self.sampler.num_workers, self.batch_size
        if self.processes == 0:
            idx = self.sampler.next_indices().view(-1).tolist()
            return collate([self.dataset[i] for i in idx], m, b)
        if self._reader is None:
            self._handed = self.sampler.snapshot()
            self._reader = iter(DataLoader(
                self.dataset, batch_sampler=_Indices(self), num_workers=self.processes,
                prefetch_factor=self.prefetch_factor, collate_fn=list))
        samples = next(self._reader)
        self._handed = self._pending.popleft()
        return collate(samples, m, b)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """Returns x (m, B, *sample_shape) and y (m, B): worker j's next B samples."""
        x, y = self._read()
        if self.augment is not None:
            x = self.augment(x, self.augment_generator)
        return x, y

    def __iter__(self) -> DatasetLoader:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        return self.next_batch()

    def close(self) -> None:
        """Stop the DataLoader processes and forget what they read ahead (a later batch starts
        them again, from the batch after the last one handed out)."""
        if self._reader is not None:
            self._reader = None
            self._pending.clear()
            self.sampler.load_state_dict(self._handed)

    def state_dict(self) -> dict:
        sampler = self._handed if self._reader is not None else self.sampler.snapshot()
        return {**sampler, "order": sampler["order"].clone(),
                "augment_generator": self.augment_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.sampler.load_state_dict(state)
        if "augment_generator" in state:
            self.augment_generator.set_state(state["augment_generator"])
