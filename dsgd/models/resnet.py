"""Residual networks with BasicBlocks (He, Zhang, Ren, Sun, "Deep residual learning for image
recognition", CVPR 2016), in the two forms small-image experiments use.

- ``resnet8``, ``resnet20``: the CIFAR nets of Section 4.2: a 3x3 conv with 16 channels, three
  stages of n BasicBlocks with 16/32/64 channels (strides 1, 2, 2), global average pooling and
  a Linear classifier; depth 6n + 2. The paper uses option A shortcuts (identity with zero
  padding, no parameters) when the shape changes; we use option B, a strided 1x1 conv + norm
  projection, the same shortcut the ImageNet nets use. It adds 2,752 parameters to
  resnet20 (272,474 instead of 269,722 for 10 classes).
- ``resnet18_micro``, ``resnet34_micro``: torchvision's ImageNet ResNet-18/34 (stages of
  64/128/256/512 channels) with the stem made for small images, as in the "micro" models of
  Zhu et al., ICML 2023. ``stem="3x3"`` (default) is the CIFAR-style stem: a 3x3 stride-1 conv
  and no max pool. ``stem="7x7"`` is the stem of the authors' released code: the ImageNet 7x7
  conv at stride 1 (padding 3), then a 3x3 max pool at stride 1 (padding 1); it keeps the shapes
  of ImageNet weights. ResNet-18 for 10 classes has 11,173,962 parameters with the 3x3 stem and
  11,181,642 with the 7x7 stem.

``norm`` picks the normalisation after every conv: "batch" (BatchNorm2d, the papers' choice),
"group" (GroupNorm, Wu & He 2018) or "none". BatchNorm keeps running statistics in buffers
(the engine gossips them like the weights, or keeps them per worker) and couples the samples of
a batch; "group" and "none" are pure functions of parameters and input. With "group" a layer
of C channels uses gcd(norm_groups, C) groups. With "none" convs get a bias in place of the
norm's shift.

Every model ends with adaptive average pooling, so any input size works (28, 32, 56, 64, ...).
Init as torchvision: Kaiming-normal (fan_out) convs, norm weight 1 and bias 0, default Linear.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from dsgd.errors import UserError
from dsgd.models.registry import image_shape, register_model

NORMS = ("batch", "group", "none")


def make_norm(norm: str, channels: int, norm_groups: int) -> nn.Module:
    """The normalisation layer after a conv with ``channels`` outputs."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(norm_groups, channels), channels)
    return nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection: relu(norm(conv(relu(norm(conv(x))))) + s(x)).

    ``s`` is the identity when shapes match, else a strided 1x1 conv + norm (option B).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, norm_groups: int):
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = make_norm(norm, c_out, norm_groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        self.norm2 = make_norm(norm, c_out, norm_groups)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias),
                make_norm(norm, c_out, norm_groups),
            )

    def forward(self, x: Tensor) -> Tensor:  # (N, c_in, H, W) -> (N, c_out, H/s, W/s)
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))  # out-of-place: vmap/grad safe


class ResNet(nn.Module):
    """Stem, stages of BasicBlocks (stride 1 for the first stage, 2 after), pool, Linear.

    ``blocks[i]`` BasicBlocks of ``widths[i]`` channels in stage i. ``stem`` is "3x3" (3x3 conv,
    stride 1, no pool) or "7x7" (7x7 conv at stride 1, then a 3x3 stride-1 max pool).
    """

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        norm: str = "batch",
        norm_groups: int = 32,
        stem: str = "3x3",
    ):
        super().__init__()
        if norm not in NORMS:
            raise UserError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
        if stem not in ("3x3", "7x7"):
            raise UserError(f"stem must be '3x3' or '7x7'; got {stem!r}")
        if isinstance(norm_groups, bool) or not isinstance(norm_groups, int) or norm_groups < 1:
            raise UserError(f"norm_groups must be a positive int; got {norm_groups!r}")
        if len(blocks) != len(widths) or not blocks:
            raise UserError(f"blocks {tuple(blocks)} and widths {tuple(widths)} differ in length")
        bias = norm == "none"
        c = widths[0]
        layers: list[nn.Module] = []
        if stem == "3x3":
            layers.append(nn.Conv2d(in_channels, c, 3, padding=1, bias=bias))
        else:
            layers.append(nn.Conv2d(in_channels, c, 7, padding=3, bias=bias))
        layers += [make_norm(norm, c, norm_groups), nn.ReLU()]
        if stem == "7x7":
            layers.append(nn.MaxPool2d(3, stride=1, padding=1))
        self.stem = nn.Sequential(*layers)
        stages: list[nn.Module] = []
        for i, (n, width) in enumerate(zip(blocks, widths, strict=True)):
            stage = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(BasicBlock(c, width, stride, norm, norm_groups))
                c = width
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, num_classes)
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def _cifar_resnet(
    name: str, n: int, num_classes: int, in_shape: tuple[int, ...], norm: str, norm_groups: int
) -> ResNet:
    c, _, _ = image_shape(name, in_shape, min_size=1)
    return ResNet((n, n, n), (16, 32, 64), num_classes, c, norm, norm_groups)


# CIFAR nets default to 2 groups per GroupNorm: with 32 (Wu & He's default) their 16-channel
# layers would get one channel per group, i.e. instance norm. Hsieh et al. (ICML 2020, "The
# non-IID data quagmire of decentralized machine learning") replace BatchNorm by GroupNorm for
# decentralized training for the same reason "group" is offered here.
@register_model("resnet8")
def resnet8(
    num_classes: int, in_shape: tuple[int, ...], norm: str = "batch", norm_groups: int = 2
) -> ResNet:
    """CIFAR ResNet-8 (n=1), 16/32/64 channels, 1x1 projection shortcuts."""
    return _cifar_resnet("resnet8", 1, num_classes, in_shape, norm, norm_groups)


@register_model("resnet20")
def resnet20(
    num_classes: int, in_shape: tuple[int, ...], norm: str = "batch", norm_groups: int = 2
) -> ResNet:
    """CIFAR ResNet-20 (n=3), 16/32/64 channels, 1x1 projection shortcuts."""
    return _cifar_resnet("resnet20", 3, num_classes, in_shape, norm, norm_groups)


@register_model("resnet18_micro")
def resnet18_micro(
    num_classes: int,
    in_shape: tuple[int, ...],
    norm: str = "batch",
    norm_groups: int = 32,
    stem: str = "3x3",
) -> ResNet:
    """ResNet-18 with a stride-1 stem and no downsampling max pool, for small images."""
    return _micro_resnet("resnet18_micro", (2, 2, 2, 2), num_classes, in_shape, norm,
                         norm_groups, stem)


@register_model("resnet34_micro")
def resnet34_micro(
    num_classes: int,
    in_shape: tuple[int, ...],
    norm: str = "batch",
    norm_groups: int = 32,
    stem: str = "3x3",
) -> ResNet:
    """ResNet-34 with a stride-1 stem and no downsampling max pool, for small images."""
    return _micro_resnet("resnet34_micro", (3, 4, 6, 3), num_classes, in_shape, norm,
                         norm_groups, stem)


def _micro_resnet(name: str, blocks: tuple[int, ...], num_classes: int,
                  in_shape: tuple[int, ...], norm: str, norm_groups: int, stem: str) -> ResNet:
    c, _, _ = image_shape(name, in_shape, min_size=1)
    return ResNet(blocks, (64, 128, 256, 512), num_classes, c, norm, norm_groups, stem)
