"""The in-memory dataset every reader returns, and the one place images are normalized.

Images are float32, NCHW, normalized per channel with the mean and standard deviation of the
*full* training set (computed before any subset is taken, so a quick run on the first 1000
samples sees the same inputs as a full run). Labels are int64 class indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dsgd.errors import UserError

_CHUNK = 8192  # rows processed at a time, to keep peak memory near the size of the result


@dataclass(frozen=True)
class Dataset:
    """A classification dataset held in memory.

    x_train: (N, *sample_shape) float32, e.g. (N, C, H, W) for images
    y_train: (N,) int64 in [0, num_classes)
    x_test, y_test: the same for the held-out set
    """

    x_train: Tensor  # (N, *sample_shape)
    y_train: Tensor  # (N,)
    x_test: Tensor  # (N_test, *sample_shape)
    y_test: Tensor  # (N_test,)
    num_classes: int
    name: str

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={tuple(self.x_train.shape)}, "
            f"test={tuple(self.x_test.shape)}, num_classes={self.num_classes})"
        )


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 images scaled to [0, 1].

    x: (N, C, H, W) uint8. Returns (mean, std), each (C,) float64. Summed in chunks so that a
    50000-image set is never copied whole to float64.
    """
    c = x.shape[1]
    total, total_sq = np.zeros(c), np.zeros(c)
    for i in range(0, len(x), _CHUNK):
        chunk = x[i : i + _CHUNK].astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 2, 3))
        total_sq += (chunk * chunk).sum(axis=(0, 2, 3))
    count = len(x) * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 1e-12))
    return mean, std


def resize(x: Tensor, image_size: int) -> Tensor:
    """Bilinear resize of a batch of images to image_size x image_size.

    x: (N, C, H, W). Returns (N, C, image_size, image_size), float32. Antialiased when
    shrinking. Resizing commutes with per-channel normalization (both are affine and the
    bilinear weights sum to one), so it may be applied to normalized images.
    """
    if image_size < 1:
        raise UserError(f"image_size must be a positive integer, got {image_size}")
    if x.ndim != 4:
        raise UserError(f"image_size applies to images (N, C, H, W), not shape {tuple(x.shape)}")
    if tuple(x.shape[2:]) == (image_size, image_size):
        return x
    out = torch.empty(len(x), x.shape[1], image_size, image_size, dtype=torch.float32)
    shrink = image_size < max(x.shape[2], x.shape[3])
    for i in range(0, len(x), _CHUNK):
        out[i : i + _CHUNK] = F.interpolate(
            x[i : i + _CHUNK].float(), size=(image_size, image_size), mode="bilinear",
            align_corners=False, antialias=shrink,
        )
    return out


def _normalize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> Tensor:
    """(N, C, H, W) uint8 -> (N, C, H, W) float32, (x / 255 - mean) / std per channel."""
    t = torch.from_numpy(x.astype(np.float32))  # a writable copy; x may be a read-only buffer
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return t.div_(255.0).sub_(m).div_(s)


def first(n: int | None, what: str, available: int) -> int:
    """How many of `available` samples to keep when the user asks for the first `n`."""
    if n is None:
        return available
    if not 1 <= n <= available:
        raise UserError(f"{what} must be between 1 and {available}, got {n}")
    return n


def check_arrays(name: str, num_classes: int, x_train, y_train, x_test, y_test) -> None:
    """The invariants every reader's output must hold, checked once, with one-line errors."""
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise UserError(f"{name}: the {split} set has {len(x)} images but {len(y)} labels; "
                            "re-download it")
        y = np.asarray(y)
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise UserError(f"{name}: {split} labels outside [0, {num_classes}) (min {y.min()}, "
                            f"max {y.max()}); re-download it")
    if tuple(x_train.shape[1:]) != tuple(x_test.shape[1:]):
        raise UserError(f"{name}: train images are {tuple(x_train.shape[1:])} but test images "
                        f"{tuple(x_test.shape[1:])}; both splits must share one shape")


def from_uint8_images(
    name: str,
    num_classes: int,
    x_train: np.ndarray,  # (N, C, H, W) uint8
    y_train: np.ndarray,  # (N,) integer
    x_test: np.ndarray,  # (N_test, C, H, W) uint8
    y_test: np.ndarray,  # (N_test,) integer
    n_train: int | None = None,
    n_test: int | None = None,
    image_size: int | None = None,
) -> Dataset:
    """Check the arrays, normalize with full-train-set channel statistics, keep the first
    n_train / n_test samples, optionally resize. Returns a Dataset with x as (N, C, H', W')
    float32. Raises UserError for labels outside [0, num_classes), counts of images and labels
    that differ, or train and test images of different shapes."""
    check_arrays(name, num_classes, x_train, y_train, x_test, y_test)
    mean, std = channel_stats(x_train)
    k_train = first(n_train, "n_train", len(x_train))
    k_test = first(n_test, "n_test", len(x_test))
    xtr = _normalize(x_train[:k_train], mean, std)
    xte = _normalize(x_test[:k_test], mean, std)
    if image_size is not None:
        xtr, xte = resize(xtr, image_size), resize(xte, image_size)
    return Dataset(
        x_train=xtr,
        y_train=torch.from_numpy(np.array(y_train[:k_train], dtype=np.int64)),
        x_test=xte,
        y_test=torch.from_numpy(np.array(y_test[:k_test], dtype=np.int64)),
        num_classes=num_classes,
        name=name,
    )


def batches(x: Tensor, y: Tensor, batch_size: int):
    """Iterate over (x, y) in order, batch_size at a time; the last batch may be smaller.

    x: (N, *sample_shape), y: (N,). Yields (x[i:i+B], y[i:i+B]) views, for evaluation.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size}")
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]
