"""dsgd.data.split: any map-style Dataset or tensors, cut among workers; the built-in loaders'
batches unchanged; exact resume with DataLoader read-ahead; the "shards" partition."""

from __future__ import annotations

import hashlib
import io
import itertools

import pytest
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import IterableDataset, TensorDataset

from dsgd.data import (
    WorkerLoader,
    crop_flip,
    dirichlet,
    iid,
    labels_of,
    load_dataset,
    shards,
    split,
)
from dsgd.errors import UserError
from dsgd.experiments import config as C
from dsgd.experiments.runner import build


class Indexed(TorchDataset):
    """A map-style Dataset that hides its tensors: split must read it sample by sample."""

    def __init__(self, x, y, with_targets=False):
        self.x, self.y = x, y
        if with_targets:
            self.targets = y.tolist()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def digest(loader, steps):
    h = hashlib.sha256()
    for _ in range(steps):
        x, y = loader.next_batch()
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
    return h.hexdigest()[:16]


def test_built_in_batches_are_what_they_were():
    """Digests of the batches WorkerLoader gave before split existed (commit c17056f), so runs
    of the built-in data sets stay bit-identical."""
    ds = load_dataset("synthetic", n_train=600, n_test=8, shape=(3, 8, 8), seed=4)
    a = WorkerLoader(ds.x_train, ds.y_train, iid(600, 4, seed=7), 16, seed=7, augment=crop_flip)
    b = WorkerLoader(ds.x_train, ds.y_train, dirichlet(ds.y_train, 5, alpha=0.5, seed=3), 8,
                     seed=3)
    assert (digest(a, 25), digest(b, 40)) == ("87538edd0227bc15", "0485cada25a43bae")


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_the_runner_loads_through_split_with_the_old_batches(partition):
    cfg = C.load(None, ["data.name=synthetic", "data.n_train=256", "data.n_test=16",
                        "model.name=mlp", "train.workers=4", "train.batch_size=8",
                        "train.seed=5", f"data.partition={partition}", "data.alpha=0.5",
                        "data.augment=true"])
    loader = build(cfg).loader
    ds = load_dataset("synthetic", n_train=256, n_test=16)
    parts = (iid(256, 4, seed=5) if partition == "iid"
             else dirichlet(ds.y_train, 4, alpha=0.5, seed=5))
    old = WorkerLoader(ds.x_train, ds.y_train, parts, 8, seed=5, augment=crop_flip)
    for _ in range(40):
        (xa, ya), (xb, yb) = loader.next_batch(), old.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def data(n=240, k=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 2, 3, generator=g), torch.arange(n) % k


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards"])
@pytest.mark.parametrize("procs", [0, 2])
def test_any_dataset_gives_the_batches_of_its_tensors(partition, procs):
    x, y = data()
    kw = dict(partition=partition, alpha=0.3, shards_per_worker=2, seed=1)
    fast = split((x, y), 4, 5, **kw)
    assert isinstance(fast, WorkerLoader)
    assert isinstance(split(TensorDataset(x, y), 4, 5, **kw), WorkerLoader)
    slow = split(Indexed(x, y), 4, 5, num_workers=procs, **kw)
    assert slow.steps_per_epoch == fast.steps_per_epoch and slow.num_workers == 4
    for _ in range(2 * fast.steps_per_epoch + 1):  # across epoch boundaries
        (xa, ya), (xb, yb) = fast.next_batch(), next(slow)
        assert xb.shape == (4, 5, 2, 3) and yb.shape == (4, 5) and yb.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    slow.close()


def test_resume_with_read_ahead_is_exact():
    x, y = torch.randn(300, 3, 4, 4), torch.arange(300) % 5  # images, for crop_flip

    def make(seed):
        return split(Indexed(x, y), 3, 7, partition="dirichlet", alpha=0.5, seed=seed,
                     augment=crop_flip, num_workers=2, prefetch_factor=3)

    loader = make(2)
    for _ in range(17):  # past an epoch end for some workers; 6 batches are read ahead
        loader.next_batch()
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)
    expected = [loader.next_batch() for _ in range(12)]
    loader.close()
    buffer.seek(0)
    resumed = make(2)
    for _ in range(5):  # elsewhere in the stream: the checkpoint decides what comes next
        resumed.next_batch()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for (xe, ye), (xr, yr) in zip(expected, itertools.islice(resumed, 12), strict=True):
        assert torch.equal(xe, xr) and torch.equal(ye, yr)
    resumed.close()
    # closing forgets the read-ahead: the batches continue where the loop left off
    again, ref = make(2), make(2)
    got = [again.next_batch() for _ in range(3)]
    again.close()
    got.append(again.next_batch())
    again.close()
    for (xa, ya), (xb, yb) in zip(got, itertools.islice(ref, 4), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    ref.close()


def test_shards_partition():
    labels = torch.arange(1000) % 10
    parts = shards(labels, 10, 2, seed=0)
    everything = torch.cat(parts)
    assert [len(p) for p in parts] == [100] * 10 and len(everything.unique()) == 1000
    # 20 shards of 50 cut from 100 samples per class: each shard holds one class
    assert all(len(labels[p].unique()) <= 2 for p in parts)
    assert max(len(labels[p].unique()) for p in parts) == 2
    assert all(torch.equal(a, b) for a, b in zip(parts, shards(labels, 10, 2, seed=0),
                                                 strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(parts, shards(labels, 10, 2, seed=1),
                                                     strict=True))
    with pytest.raises(UserError, match="shards"):
        shards(labels, 10, 200, seed=0)


def test_labels_come_from_targets_or_from_the_samples():
    x, y = data(50)

    class TargetsOnly(Indexed):
        def __getitem__(self, i):
            raise AssertionError("samples read although targets exist")

    assert torch.equal(labels_of(TargetsOnly(x, y, with_targets=True)), y)
    assert torch.equal(labels_of(Indexed(x, y)), y)


def test_unusable_data_is_a_one_line_error():
    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(2), 0

    with pytest.raises(UserError, match="map-style Dataset"):
        split(Stream(), 2, 4)

    class Strings(Indexed):
        def __getitem__(self, i):
            return "not a tensor", 0

    x, y = data(40)
    with pytest.raises(UserError, match="dataset\\[i\\] must return") as err:
        split(Strings(x, y), 2, 4).next_batch()
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="partition"):
        split((x, y), 2, 4, partition="sorted")
