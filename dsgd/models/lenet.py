"""LeNet-5 (LeCun, Bottou, Bengio, Haffner, "Gradient-based learning applied to document
recognition", Proc. IEEE 1998), in its common modern form: ReLU instead of scaled tanh, max
pooling instead of trainable subsampling, full C3 connectivity, a Linear output instead of RBFs.

C1 6@5x5 (padding 2, so 28x28 digits give the paper's 28x28 C1 map) - pool 2 - C3 16@5x5 -
pool 2 - C5 120 - F6 84 - output. An adaptive average pool to 5x5 before C5 lets any input of
at least 12x12 work; at 28x28 it is the identity and the net is exactly the classic one
(61,706 parameters for 1x28x28 and 10 classes).
"""

from __future__ import annotations

from torch import Tensor, nn

from dsgd.models.registry import image_shape, register_model


class LeNet5(nn.Module):
    """LeNet-5 for (N, in_channels, H, W) images, H, W >= 12."""

    def __init__(self, num_classes: int, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),  # C1
            nn.ReLU(),
            nn.MaxPool2d(2),  # S2
            nn.Conv2d(6, 16, kernel_size=5),  # C3
            nn.ReLU(),
            nn.MaxPool2d(2),  # S4
            nn.AdaptiveAvgPool2d(5),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120),  # C5 (a 5x5 conv on a 5x5 map is a Linear)
            nn.ReLU(),
            nn.Linear(120, 84),  # F6
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, num_classes)
        return self.classifier(self.features(x).flatten(1))


@register_model("lenet5")
def lenet5(num_classes: int, in_shape: tuple[int, ...]) -> LeNet5:
    """LeNet-5 for (C, H, W) samples with H, W >= 12."""
    c, _, _ = image_shape("lenet5", in_shape, min_size=12)
    return LeNet5(num_classes, c)
