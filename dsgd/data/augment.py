"""Data augmentation as batched tensor ops with an explicit torch.Generator.

Every function takes images shaped (..., C, H, W), e.g. (N, C, H, W) or (m, B, C, H, W), and
returns the same shape. The random draws (one per image) are made on the generator's device
and moved to the images' device, so a CPU generator drives GPU batches too. No per-image Python
loop. `crop_flip` has the (x, generator) signature WorkerLoader's `augment` expects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def crop_at(x: Tensor, top: Tensor, left: Tensor, pad: int) -> Tensor:
    """Zero-pad every image by `pad` on each side, then cut the H x W window whose corner is at
    (top, left) in the padded image: out[n, c, i, j] = x[n, c, i + top[n] - pad, j + left[n] - pad],
    or 0 where that falls outside x. top, left: (N,) ints in [0, 2 * pad], N = number of
    images. Returns (..., C, H, W)."""
    c, h, w = x.shape[-3:]
    flat = x.reshape(-1, c, h, w)  # (N, C, H, W)
    n, hp, wp = flat.shape[0], h + 2 * pad, w + 2 * pad
    padded = F.pad(flat, (pad, pad, pad, pad)).view(n, c, hp * wp)  # (N, C, Hp * Wp)
    dev = x.device
    rows = top.to(dev).view(n, 1) + torch.arange(h, device=dev)  # (N, H)
    cols = left.to(dev).view(n, 1) + torch.arange(w, device=dev)  # (N, W)
    where = (rows.view(n, h, 1) * wp + cols.view(n, 1, w)).view(n, 1, h * w)  # (N, 1, H * W)
    out = padded.gather(2, where.expand(n, c, h * w))  # (N, C, H * W)
    return out.reshape(x.shape)


def random_crop(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop with zero padding (pad 4 for 32 x 32 CIFAR): each image is shifted by an
    independent, uniform offset in [-pad, pad] along each axis. Returns (..., C, H, W)."""
    if pad == 0:
        return x
    n = x[..., 0, 0, 0].numel()
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=generator.device)
    return crop_at(x, offsets[0], offsets[1], pad)


def random_flip(x: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Mirror each image left-right with probability p, independently. Returns (..., C, H, W)."""
    lead = x.shape[:-3]
    flip = torch.rand(lead, generator=generator, device=generator.device) < p  # (...)
    return torch.where(flip.to(x.device)[..., None, None, None], x.flip(-1), x)


def crop_flip(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """The standard CIFAR augmentation: random_crop(pad), then random_flip(0.5).
    Returns (..., C, H, W). For another pad use functools.partial(crop_flip, pad=...)."""
    return random_flip(random_crop(x, generator, pad), generator)
