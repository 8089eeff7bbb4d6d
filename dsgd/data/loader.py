"""Per-worker mini-batches for m simulated workers, drawn together as one stacked batch.

Worker j sweeps its own shard in a fresh random order every epoch, B samples per step; a
partial batch at the end of an epoch is dropped (as DataLoader(drop_last=True) does), so every
step gives every worker exactly B samples. Shards may have unequal lengths (a Dirichlet
partition): each worker then starts its next epoch on its own schedule.

All workers are served at once: one (m, L) tensor of random keys is argsorted into m
permutations (padding sorts last), and a batch is one gather. The sampler's whole state is a
generator, the current permutations and per-worker positions, so a checkpoint taken with
state_dict() and restored with load_state_dict() continues with exactly the same batches.

``IndexSampler`` draws the (m, B) sample indices; ``WorkerLoader`` gathers them from tensors
(and augments); ``dsgd.data.split.DatasetLoader`` reads them from any map-style Dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dsgd.errors import UserError

Augment = Callable[[Tensor, torch.Generator], Tensor]  # (m, B, *S) -> (m, B, *S)


class IndexSampler:
    """Infinite stream of (m, B) dataset indices, worker j's row from its own shard.

    parts: m index tensors into a data set of n samples, one shard per worker (partition.py).
    batch_size: B, per worker. seed: seeds the shuffles (``generator``; WorkerLoader's
    augmentation draws from it too, which keeps its batches what they always were).
    """

    def __init__(self, parts: Sequence[Tensor], batch_size: int, n: int, seed: int = 0):
        if len(parts) < 1:
            raise UserError("the partition is empty; need at least one worker")
        lengths = torch.tensor([len(p) for p in parts], dtype=torch.int64)  # (m,)
        if batch_size < 1 or int(lengths.min()) < batch_size:
            raise UserError(
                f"batch size {batch_size} per worker needs every shard to hold at least that "
                f"many samples, but the smallest holds {int(lengths.min())}; lower the batch "
                "size or use fewer workers (or a larger Dirichlet alpha)"
            )
        self.batch_size = batch_size
        self.lengths = lengths
        # (m, L_max) dataset indices of each shard; the padding is never read.
        self.shards = torch.nn.utils.rnn.pad_sequence(
            [torch.as_tensor(p, dtype=torch.int64).cpu() for p in parts], batch_first=True
        )
        if n and (self.shards.min() < 0 or self.shards.max() >= n):
            raise UserError(f"the partition indexes outside the {n} training samples")
        m, width = self.shards.shape
        self._valid = torch.arange(width) < lengths.view(m, 1)  # (m, L_max)
        self.generator = torch.Generator().manual_seed(seed)
        # (m, L_max) current permutations: replaced, never written in place, so a snapshot
        # (see snapshot()) may share it
        self.order = torch.empty(m, width, dtype=torch.int64)
        self.pos = torch.zeros(m, dtype=torch.int64)  # (m,) next position in each permutation
        self.epochs = torch.zeros(m, dtype=torch.int64)  # (m,) epoch each worker is in
        self._shuffle(torch.ones(m, dtype=torch.bool))

    @property
    def num_workers(self) -> int:
        return len(self.lengths)

    @property
    def steps_per_epoch(self) -> int:
        """Full batches in one sweep of the smallest shard."""
        return int((self.lengths // self.batch_size).min())

    @property
    def epoch(self) -> int:
        """Epochs completed by the slowest worker (all workers agree when shards are equal)."""
        return int(self.epochs.min())

    def _shuffle(self, rows: Tensor) -> None:
        """Draw a fresh permutation for the workers where rows (m,) is True."""
        keys = torch.rand(int(rows.sum()), self.shards.shape[1], generator=self.generator)
        keys = keys.masked_fill(~self._valid[rows], 2.0)  # padding sorts after every real key
        order = self.order.clone()
        order[rows] = keys.argsort(dim=1)
        self.order = order

    def next_indices(self) -> Tensor:
        """(m, B) int64: the dataset indices of every worker's next B samples."""
        b = self.batch_size
        done = self.pos + b > self.lengths  # (m,) workers whose epoch is used up
        if bool(done.any()):
            self._shuffle(done)
            self.pos[done] = 0
            self.epochs[done] += 1
        slots = self.order.gather(1, self.pos.view(-1, 1) + torch.arange(b))  # (m, B)
        self.pos += b
        return self.shards.gather(1, slots)  # (m, B) dataset indices

    def snapshot(self) -> dict:
        """state_dict() without copying the permutations (they are never written in place)."""
        return {
            "generator": self.generator.get_state(),
            "order": self.order,
            "pos": self.pos.clone(),
            "epochs": self.epochs.clone(),
            "lengths": self.lengths,
            "batch_size": self.batch_size,
        }

    def state_dict(self) -> dict:
        """Everything needed to continue with the same batches: the generator state, the
        current permutations, positions and epochs. Plain tensors and ints."""
        return {**self.snapshot(), "order": self.order.clone(), "lengths": self.lengths.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict() taken over the same partition and batch size."""
        if state["batch_size"] != self.batch_size or not torch.equal(
            state["lengths"], self.lengths
        ):
            raise UserError(
                "the data loader checkpoint was taken with another partition or batch size; "
                "resume with the same workers, partition and batch size"
            )
        self.generator.set_state(state["generator"])
        self.order = state["order"].clone()
        self.pos.copy_(state["pos"])
        self.epochs.copy_(state["epochs"])


class WorkerLoader:
    """Infinite stream of stacked per-worker batches from tensors held in memory.

    x: (N, *sample_shape) training inputs, y: (N,) labels; they may live on any device.
    parts: m index tensors into x, one shard per worker (see partition.py).
    batch_size: B, per worker. seed: seeds the shuffles and the augmentation.
    augment: optional f(x, generator) applied to every batch, e.g. augment.crop_flip.

    next_batch() (or next(loader)) returns (x, y) with x (m, B, *sample_shape) and y (m, B).
    Iteration never ends: take loader.steps_per_epoch batches for one epoch.
    """

    def __init__(
        self,
        x: Tensor,  # (N, *sample_shape)
        y: Tensor,  # (N,)
        parts: Sequence[Tensor],
        batch_size: int,
        seed: int = 0,
        augment: Augment | None = None,
    ):
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        self.sampler = IndexSampler(parts, batch_size, len(x), seed)
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.augment = augment

    # the sampler's view, under the names this class always had
    num_workers = property(lambda self: self.sampler.num_workers)
    steps_per_epoch = property(lambda self: self.sampler.steps_per_epoch)
    epoch = property(lambda self: self.sampler.epoch)
    generator = property(lambda self: self.sampler.generator)
    lengths = property(lambda self: self.sampler.lengths)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """Returns x (m, B, *sample_shape) and y (m, B): worker j's next B samples."""
        idx = self.sampler.next_indices()  # (m, B)
        flat = idx.view(-1).to(self.x.device)  # (m * B,)
        xb = self.x.index_select(0, flat).view(*idx.shape, *self.x.shape[1:])  # (m, B, *S)
        yb = self.y.index_select(0, flat.to(self.y.device)).view(idx.shape)  # (m, B)
        if self.augment is not None:
            xb = self.augment(xb, self.generator)
        return xb, yb

    def __iter__(self) -> WorkerLoader:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
