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

Random compressors (``random = True``: random-k, QSGD, and ``Rescaled`` around them) draw each
worker's numbers from that worker's own generator, seeded from (seed, global worker index):
``generator_states(seed, workers)`` makes their states, ``compress_rows(compressor, x, states)``
compresses row j with generator j. So a worker draws the same numbers whichever process hosts
it: all m workers in one process, or a block of them per torchrun rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from dsgd.errors import UserError


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
    random: bool  # draws random numbers (then compressed row by row, see compress_rows)

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


def join(messages: list[Message]) -> Message:
    """One message of the rows of ``messages`` (each of the same compressor and size)."""
    def cat(parts: list[Tensor | None]) -> Tensor | None:
        return None if parts[0] is None else torch.cat(parts)

    first = messages[0]
    return Message(torch.cat([msg.values for msg in messages]), first.size,
                   cat([msg.indices for msg in messages]), cat([msg.scale for msg in messages]),
                   first.meta)


_SALT = 0x5F3759DF  # keeps these streams apart from the fault draws of the same seed


def worker_seed(seed: int, worker: int) -> int:
    """The seed of global worker ``worker``'s generator (in the range manual_seed accepts)."""
    return ((seed ^ _SALT) * 1_000_003 + worker) % 2**64


def generator_states(seed: int, workers: range) -> Tensor:
    """(len(workers), L) uint8: the initial state of each worker's CPU generator."""
    return torch.stack([torch.Generator().manual_seed(worker_seed(seed, j)).get_state()
                        for j in workers])


def compress_rows(compressor: Compressor, x: Tensor, states: Tensor) -> tuple[Message, Tensor]:
    """``compressor.compress(x)`` for x: (m_local, P), row j drawing from the generator whose
    state is ``states[j]`` (``generator_states``); returns the message and the new states. A
    deterministic compressor compresses all rows in one call and leaves the states alone."""
    if not getattr(compressor, "random", True):  # one that does not say: row by row, to be safe
        return compressor.compress(x), states
    if states.ndim != 2 or states.shape[0] != x.shape[0]:
        raise UserError("this checkpoint holds one random-compressor stream for all workers "
                        "(written by an older dsgd, before each worker drew its own): start "
                        "the run afresh")
    gen, messages, after = torch.Generator(), [], []
    for row, state in zip(x.split(1), states.cpu()):  # generators live on the CPU
        gen.set_state(state.clone())  # set_state crashes on a view into a larger storage
        messages.append(compressor.compress(row, generator=gen))
        after.append(gen.get_state())
    return join(messages), torch.stack(after)


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
    random = False

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
    random = False

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
    random = True

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

    def omega(self, size: int) -> float:
        """E ||Q(x) - x||^2 = omega ||x||^2 (the rescaling by size / k makes it unbiased)."""
        return size / _k(self.ratio, size) - 1

    def bytes(self, msg: Message) -> int:
        return msg.values.shape[1] * msg.values.element_size() + 8  # values + the indices' seed


@dataclass(frozen=True)
class QSGD:
    """Stochastic quantization (Alistarh et al. 2017) to ``levels`` levels of each entry's
    magnitude relative to the norm of its bucket of ``bucket`` entries (0: one bucket, the whole
    vector), rounded up or down at random so that E[Q(x)] = x."""

    levels: int = 7  # 7 levels: 3 bits and a sign bit an entry
    bucket: int = 512  # entries sharing one norm (as in the QSGD paper); 0: the whole vector
    name = "qsgd"
    random = True

    def __post_init__(self):
        if self.levels < 1:
            raise ValueError(f"QSGD needs levels >= 1, got {self.levels}")
        if self.bucket < 0:
            raise ValueError(f"QSGD needs bucket >= 0, got {self.bucket}")

    def _width(self, size: int) -> int:
        return min(self.bucket, size) if self.bucket else size

    def compress(self, x: Tensor, generator: torch.Generator | None = None) -> Message:
        m, size = x.shape
        b = self._width(size)
        nb = -(-size // b)
        padded = torch.nn.functional.pad(x, (0, nb * b - size)).view(m, nb, b)
        norm = padded.norm(dim=2, keepdim=True)  # (m, nb, 1)
        level = padded.abs() / norm.clamp_min(torch.finfo(x.dtype).tiny) * self.levels
        u = torch.rand(padded.shape, generator=generator, device=generator.device
                       if generator is not None else x.device).to(x.device, x.dtype)
        q = torch.floor(level + u).clamp_(max=self.levels)  # E[q] = level: unbiased
        values = (torch.sign(padded) * q).view(m, nb * b)[:, :size]
        return Message(values, size, scale=(norm / self.levels).view(m, nb))

    def decompress(self, msg: Message) -> Tensor:
        b = self._width(msg.size)
        return msg.values * msg.scale.repeat_interleave(b, dim=1)[:, :msg.size]

    def omega(self, size: int) -> float:
        """E ||Q(x) - x||^2 <= omega ||x||^2 (Alistarh et al. 2017, Lemma 3.1, per bucket)."""
        b = self._width(size)
        return min(b / self.levels**2, math.sqrt(b) / self.levels)

    def bytes(self, msg: Message) -> int:
        bits = 1 + math.ceil(math.log2(self.levels + 1))
        # packed sign and level, one float32 norm a bucket
        return math.ceil(msg.size * bits / 8) + 4 * msg.scale.shape[1]


@dataclass(frozen=True)
class Rescaled:
    """An unbiased compressor with variance omega, decoded as Q(x) / (1 + omega): a contraction,
    E ||Q(x) / (1 + omega) - x||^2 <= (1 - 1 / (1 + omega)) ||x||^2, as CHOCO-SGD needs
    (Koloskova et al. 2019, the rescaled unbiased operators). The message is the inner one."""

    inner: Any

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def random(self) -> bool:
        return self.inner.random

    def compress(self, x: Tensor, generator: torch.Generator | None = None) -> Message:
        return self.inner.compress(x, generator)

    def decompress(self, msg: Message) -> Tensor:
        return self.inner.decompress(msg) / (1 + self.inner.omega(msg.size))

    def bytes(self, msg: Message) -> int:
        return self.inner.bytes(msg)


@dataclass(frozen=True)
class Sign:
    name = "sign"
    random = False

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
    random = False

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


def as_contraction(compression: Any):
    """The compressor ``compression`` names (or is), an unbiased one (with an ``omega``) wrapped
    in ``Rescaled``: what error feedback and CHOCO-SGD need, a contraction."""
    if isinstance(compression, str):
        compression = make_compressor(compression)
    return Rescaled(compression) if hasattr(compression, "omega") else compression


COMPRESSORS: dict[str, type] = {"none": Identity, "topk": TopK, "randomk": RandomK,
                                "qsgd": QSGD, "sign": Sign, "lowp": LowPrecision}


def make_compressor(name: str, **options: Any):
    """The compressor called ``name`` ("none", "topk", "randomk", "qsgd", "sign", "lowp")."""
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; choose one of {', '.join(COMPRESSORS)}")
    return COMPRESSORS[name](**options)


__all__ = ["COMPRESSORS", "QSGD", "Compressor", "Identity", "LowPrecision", "Message", "RandomK",
           "Rescaled", "Sign", "TopK", "as_contraction", "compress_rows", "generator_states",
           "join", "make_compressor", "rows", "worker_seed"]
