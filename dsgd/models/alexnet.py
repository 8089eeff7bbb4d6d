"""AlexNet for small images (Krizhevsky, "One weird trick for parallelizing convolutional neural
networks", 2014: the single-tower AlexNet torchvision ships), as the "micro" AlexNet of Zhu et
al., ICML 2023, trained there on 64x64 CIFAR-10.

Five convs as torchvision's (64@11x11, 192@5x5, 384@3x3, 256@3x3, 256@3x3, with 3x3 stride-2
max pools after the 1st, 2nd and 5th) but the first conv at stride 1 instead of 4, so a 64x64
image leaves a 6x6 map, the size a 224x224 image leaves in the original. Global average pooling
then makes any input of at least 21x21 work (28x28 Fashion-MNIST, 32x32 CIFAR, 64x64).

Head: by default the three fully connected layers of AlexNet, 256 -> 4096 -> 4096 -> classes
with ReLU. ``fc_hidden=()`` gives a single Linear(256, classes), the head of the authors'
released code. ``norm="batch"`` adds BatchNorm after the ReLU of convs 1, 2 and 5 (before
their pools), as that code does; the default "none" keeps the net a pure function of its
parameters. ``dropout`` (0 by default; AlexNet used 0.5) goes before the first two FC layers;
under ``torch.func.vmap`` dropout needs ``randomness="different"`` or ``"same"``.

Parameters for 3 input channels and 10 classes: 20,344,650 with the default head, 2,473,290
with ``fc_hidden=()`` and ``norm="batch"`` (the authors' model).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from dsgd.errors import UserError
from dsgd.models.registry import image_shape, register_model


class AlexNetMicro(nn.Module):
    """AlexNet with a stride-1 first conv and global average pooling, for small images."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        fc_hidden: Sequence[int] = (4096, 4096),
        norm: str = "none",
        dropout: float = 0.0,
    ):
        super().__init__()
        if norm not in ("batch", "none"):
            raise UserError(f"alexnet_micro norm must be 'batch' or 'none'; got {norm!r}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1); got {dropout!r}")

        def bn(c: int) -> list[nn.Module]:
            return [nn.BatchNorm2d(c)] if norm == "batch" else []

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=11, stride=1, padding=2),  # stride 4 -> 1
            nn.ReLU(),
            *bn(64),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(),
            *bn(192),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            *bn(256),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.AdaptiveAvgPool2d(1),
        )
        head: list[nn.Module] = []
        width = 256
        for h in fc_hidden:
            if dropout > 0:
                head.append(nn.Dropout(dropout))
            head += [nn.Linear(width, h), nn.ReLU()]
            width = h
        head.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, num_classes)
        return self.classifier(self.features(x).flatten(1))


@register_model("alexnet_micro")
def alexnet_micro(
    num_classes: int,
    in_shape: tuple[int, ...],
    fc_hidden: Sequence[int] = (4096, 4096),
    norm: str = "none",
    dropout: float = 0.0,
) -> AlexNetMicro:
    """Small-image AlexNet for (C, H, W) samples with H, W >= 21 (the paper used 64x64)."""
    c, _, _ = image_shape("alexnet_micro", in_shape, min_size=21)
    fc_hidden = tuple(fc_hidden)
    if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in fc_hidden):
        raise UserError(f"alexnet_micro fc_hidden must be positive ints, got {fc_hidden!r}")
    return AlexNetMicro(num_classes, c, fc_hidden, norm, dropout)
