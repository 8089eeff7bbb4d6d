"""Model zoo for D-SGD experiments, written to run under ``torch.func``.

``build_model(name, num_classes, in_shape, **options)`` builds any registered model; ``MODELS``
maps names to factories; ``@register_model(name)`` adds one. Built in:

=================  ===========================================================================
``mlp``            flatten + ReLU MLP (any input shape; MNIST-1D baseline sizes)
``cnn1d``          MNIST-1D ConvBase (Greydanus 2020), samples (L,) or (C, L)
``lenet5``         LeNet-5 (LeCun et al. 1998), ReLU + max pool
``resnet8``        CIFAR ResNet-8 (He et al. 2016), 16/32/64 channels
``resnet20``       CIFAR ResNet-20 (He et al. 2016), 16/32/64 channels
``resnet18_micro`` ResNet-18 with a stride-1 stem for small images (Zhu et al. 2023)
``resnet34_micro`` ResNet-34 with a stride-1 stem for small images (Zhu et al. 2023)
``alexnet_micro``  AlexNet with a stride-1 first conv for 64x64 images (Zhu et al. 2023)
=================  ===========================================================================
"""

# The family modules register their factories when imported.
from dsgd.models.alexnet import AlexNetMicro
from dsgd.models.cnn1d import CNN1D
from dsgd.models.lenet import LeNet5
from dsgd.models.mlp import MLP
from dsgd.models.registry import (
    MODELS,
    ModelFactory,
    build_model,
    image_shape,
    num_parameters,
    register_model,
)
from dsgd.models.resnet import BasicBlock, ResNet

__all__ = [
    "MODELS",
    "AlexNetMicro",
    "BasicBlock",
    "CNN1D",
    "LeNet5",
    "MLP",
    "ModelFactory",
    "ResNet",
    "build_model",
    "image_shape",
    "num_parameters",
    "register_model",
]
