"""Compressors for gossip messages, row-wise over a stack of workers' vectors.

``compress(x, generator) -> Message`` takes x: (m, P), one message per row (per worker);
``decompress(message) -> (m, P)``; ``bytes(message)`` is what one row's message puts on a real
wire: the values, the indices that locate them and the scales, at their stored widths (indices
as int32, quantized levels bit-packed).

- ``Identity()``: the vector itself.
- ``TopK(ratio)``: the k = ceil(ratio * P) entries of largest magnitude, with their indices.
- ``RandomK(ratio)``: k entries chosen uniformly at random, scaled by P / k (unbiased); the
  receiver regenerates the indices from an 8-byte seed.
- ``QSGD(levels)``: stochastic quantization (Alistarh et al. 2017) of |x_i| / ||x|| onto
  ``levels`` levels, unbiased; a sign bit and ceil(log2(levels + 1)) bits an entry, one norm.
- ``Sign()``: scaled sign, (||x||_1 / P) sign(x) (Karimireddy et al. 2019); a bit an entry.
- ``LowPrecision(dtype)``: bf16 or fp16 values.

``make_compressor("topk", ratio=0.01)`` builds one by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class Message:
    """What each worker sends: ``values`` (m, k) in ``dtype``; optional ``indices`` (m, k) and
    ``scale`` (m, 1); ``size`` the length P of the vector it encodes."""

    values: Tensor
    size: int
    indices: Tensor | None = None
    scale: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Compressor(Protocol):
    name: str

    def compress(self, x: Tensor, generator: torch.Generator | None = None) -> Message:
        ...

    def decompress(self, msg: Message) -> Tensor:
        ...

    def bytes(self, msg: Message) -> int:  # one row's message on the wire
        ...


def rows(msg: Message, index: Tensor) -> Message:
    """The messages of the rows ``index`` (what one neighbour receives)."""
    def pick(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[index]

    return Message(msg.values[index], msg.size, pick(msg.indices), pick(msg.scale), msg.meta)


def _scatter(msg: Message) -> Tensor:
    """The dense (m, P) rows of a sparse message: its values at its indices, zeros elsewhere."""
    assert msg.indices is not None
    out = msg.values.new_zeros(msg.values.shape[0], msg.size)
    return out.scatter_(1, msg.indices, msg.values)


def _k(ratio: float, size: int) -> int:
    return min(size, max(1, math.ceil(ratio * size)))


def _check_ratio(ratio: float) -> None:
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")


@dataclass(frozen=True)
class Identity:
    name = "none"

    def compress(self, x: Tensor, generator: torch.Generator | None = None) -> Message:
        return Message(x, x.shape[1])

    def decompress(self, msg: Message) -> Tensor:
        return msg.values

    def bytes(self, msg: Message) -> int:
        return msg.size * msg.values.element_size()


@dataclass(frozen=True)
class TopK:
    ratio: float = 0.01
    name = "topk"

    def __post_init__(self):
        _check_ratio(self.ratio)

    def compress(self, x: Tensor, generator: torch.Generator | None = None) -> Message:
        idx = x.abs().topk(_k(self.ratio, x.shape[1]), dim=1, sorted=False).indices  # (m, k)
        return Message(torch.gather(x, 1, idx), x.shape[1], indices=idx)

    def decompress(self, msg: Message) -> Tensor:
        return _scatter(msg)

    def bytes(self, msg: Message) -> int:
        return msg.values.shape[1] * (msg.values.element_size() + 4)  # values + int32 indices


@dataclass(frozen=True)
class RandomK:
    ratio: float = 0.01
    name = "randomk"

    def __post_init__(self):
        _check_ratio(self.ratio)

    def compress(self, x: Tensor, generator: torch.Generator | None = None) -> Message:
        m, size = x.shape
        k = _k(self.ratio, size)
        keys = torch.rand(m, size, generator=generator, device=generator.device
                          if generator is not None else x.device).to(x.device)
        idx = keys.topk(k, dim=1, sorted=False).indices  # k distinct uniform indices per row
        return Message(torch.gather(x, 1, idx) * (size / k), size, indices=idx)

    def decompress(self, msg: Message) -> Tensor:
        return _scatter(msg)

    def bytes(self, msg: Message) -> int:
        return msg.values.shape[1] * msg.values.element_size() + 8  # values + the indices' seed


@dataclass(frozen=True)
class QSGD:
    levels: int = 7  # 7 levels: 3 bits and a sign bit an entry
    name = "qsgd"

    def __post_init__(self):
        if self.levels < 1:
            raise ValueError(f"QSGD needs levels >= 1, got {self.levels}")

    def compress(self, x: Tensor, generator: torch.Generator | None = None) -> Message:
        norm = x.norm(dim=1, keepdim=True)  # (m, 1)
        level = x.abs() / norm.clamp_min(torch.finfo(x.dtype).tiny) * self.levels
        u = torch.rand(x.shape, generator=generator, device=generator.device
                       if generator is not None else x.device).to(x.device, x.dtype)
        q = torch.floor(level + u).clamp_(max=self.levels)  # E[q] = level: unbiased
        return Message(torch.sign(x) * q, x.shape[1], scale=norm / self.levels)

    def decompress(self, msg: Message) -> Tensor:
        return msg.values * msg.scale

    def bytes(self, msg: Message) -> int:
        bits = 1 + math.ceil(math.log2(self.levels + 1))
        return math.ceil(msg.size * bits / 8) + 4  # packed sign and level, one float32 norm


@dataclass(frozen=True)
class Sign:
    name = "sign"

    def compress(self, x: Tensor, generator: torch.Generator | None = None) -> Message:
        return Message(torch.sign(x), x.shape[1], scale=x.abs().mean(1, keepdim=True))

    def decompress(self, msg: Message) -> Tensor:
        return msg.values * msg.scale

    def bytes(self, msg: Message) -> int:
        return math.ceil(msg.size / 8) + 4  # a bit an entry, one float32 scale


@dataclass(frozen=True)
class LowPrecision:
    dtype: str = "bf16"
    name = "lowp"

    def __post_init__(self):
        if self.dtype not in ("bf16", "fp16"):
            raise ValueError(f"LowPrecision dtype must be bf16 or fp16, got {self.dtype!r}")

    def compress(self, x: Tensor, generator: torch.Generator | None = None) -> Message:
        wire = torch.bfloat16 if self.dtype == "bf16" else torch.float16
        return Message(x.to(wire), x.shape[1], meta={"dtype": x.dtype})

    def decompress(self, msg: Message) -> Tensor:
        return msg.values.to(msg.meta["dtype"])

    def bytes(self, msg: Message) -> int:
        return msg.size * 2


COMPRESSORS: dict[str, type] = {"none": Identity, "topk": TopK, "randomk": RandomK,
                                "qsgd": QSGD, "sign": Sign, "lowp": LowPrecision}


def make_compressor(name: str, **options: Any):
    """The compressor called ``name`` ("none", "topk", "randomk", "qsgd", "sign", "lowp")."""
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; choose one of {', '.join(COMPRESSORS)}")
    return COMPRESSORS[name](**options)


__all__ = ["COMPRESSORS", "QSGD", "Compressor", "Identity", "LowPrecision", "Message", "RandomK",
           "Sign", "TopK", "make_compressor", "rows"]
