"""Small 1-D convolutional net for MNIST-1D.

The ``ConvBase`` model of MNIST-1D (Greydanus, "Scaling down deep learning", 2020): three
Conv1d layers of 25 channels (kernels 5, 3, 3; stride 2; padding 1) with ReLU, then a Linear
classifier on the flattened (25 x 5) map. For a length-40 sample the last map is already 5 long;
an adaptive average pool to length 5 makes other lengths work and is the identity at 40.
About 5.2k parameters for 10 classes.
"""

from __future__ import annotations

from torch import Tensor, nn

from dsgd.errors import UserError
from dsgd.models.registry import register_model


class CNN1D(nn.Module):
    """Conv1d(k5,s2)-ReLU-Conv1d(k3,s2)-ReLU-Conv1d(k3,s2)-ReLU-pool(5)-Linear."""

    def __init__(self, num_classes: int, in_channels: int = 1, channels: int = 25):
        super().__init__()
        self.in_channels = in_channels
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, channels, kernel_size=5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(5),
        )
        self.classifier = nn.Linear(channels * 5, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (N, L) or (N, C, L) -> (N, num_classes)
        x = x.reshape(x.shape[0], self.in_channels, -1)  # (N, C, L); adds C=1 to flat samples
        return self.classifier(self.features(x).flatten(1))


@register_model("cnn1d")
def cnn1d(num_classes: int, in_shape: tuple[int, ...], channels: int = 25) -> CNN1D:
    """1-D conv net for samples shaped (L,) (one channel) or (C, L); needs L >= 3."""
    if len(in_shape) not in (1, 2):
        raise UserError(f"model 'cnn1d' needs samples shaped (L,) or (C, L); got {in_shape}")
    in_channels = 1 if len(in_shape) == 1 else in_shape[0]
    if in_shape[-1] < 3:
        raise UserError(f"model 'cnn1d' needs sequences of length >= 3; got {in_shape[-1]}")
    return CNN1D(num_classes, in_channels, channels)
