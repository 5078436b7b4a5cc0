"""ResNets for CIFAR (He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016, arXiv:1512.03385, section 4.2) and a small MLP.

The CIFAR ResNet has a 3x3 stem with 16 channels, then 3 stages of ``n`` basic
blocks with 16, 32 and 64 channels on 32x32, 16x16 and 8x8 maps, global average
pooling and one linear layer: ``depth = 6n + 2`` weighted layers.

Shortcuts where the shape changes follow the paper's option A by default: the
identity, subsampled by 2 and zero-padded in channels, so the shortcut adds no
parameter (ResNet-20: 269,722 parameters). Option B (1x1 convolution + batch norm
projection, 272,474 parameters for ResNet-20) is available as ``shortcut="B"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNet", "MLP", "resnet20", "resnet32", "resnet44", "resnet56"]


class _PadShortcut(nn.Module):
    """Option A shortcut: stride-2 subsampling, then zero channels appended."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads the last dims first: (W_l, W_r, H_t, H_b, C_front, C_back). Half the
        # new channels go on each side, as in the reference Torch implementation.
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra}"


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet of depth ``6n + 2`` for 32x32 images (any size >= 8 works).

    Args:
        depth: number of weighted layers, ``6n + 2`` (20, 32, 44, 56, 110, ...).
        num_classes: outputs of the final linear layer.
        in_channels: channels of the input images (3 for RGB).
        shortcut: ``"A"`` (parameter-free zero-padding identity, the paper's CIFAR
            choice) or ``"B"`` (1x1 convolution + batch norm projection).

    Raises:
        ValueError: ``depth`` is not ``6n + 2`` with ``n >= 1``, or another argument is
            out of range.

    Example::

        >>> model = CifarResNet(depth=20)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: Literal["A", "B"] = "A",
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"`depth` must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110), got {depth!r}.")
        if num_classes < 1:
            raise ValueError(f"`num_classes` must be >= 1, got {num_classes}.")
        if in_channels < 1:
            raise ValueError(f"`in_channels` must be >= 1, got {in_channels}.")
        if shortcut not in ("A", "B"):
            raise ValueError(f"`shortcut` must be 'A' or 'B', got {shortcut!r}.")
        self.depth = depth
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1, shortcut))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He et al. initialise convolutions with He-normal (their ref. [13]); fan_out as in
        # torchvision's ResNets keeps the backward signal's variance constant.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def resnet20(num_classes: int = 10, in_channels: int = 3, shortcut: Literal["A", "B"] = "A") -> CifarResNet:
    """ResNet-20 (n = 3): 269,722 parameters with option A shortcuts."""
    return CifarResNet(20, num_classes, in_channels, shortcut)


def resnet32(num_classes: int = 10, in_channels: int = 3, shortcut: Literal["A", "B"] = "A") -> CifarResNet:
    """ResNet-32 (n = 5): 0.46M parameters."""
    return CifarResNet(32, num_classes, in_channels, shortcut)


def resnet44(num_classes: int = 10, in_channels: int = 3, shortcut: Literal["A", "B"] = "A") -> CifarResNet:
    """ResNet-44 (n = 7): 0.66M parameters."""
    return CifarResNet(44, num_classes, in_channels, shortcut)


def resnet56(num_classes: int = 10, in_channels: int = 3, shortcut: Literal["A", "B"] = "A") -> CifarResNet:
    """ResNet-56 (n = 9): 0.85M parameters."""
    return CifarResNet(56, num_classes, in_channels, shortcut)


class MLP(nn.Module):
    """Fully connected ReLU network; inputs of any shape are flattened first.

    Args:
        in_features: size of one flattened input (64 for 8x8 digits).
        hidden: widths of the hidden layers, e.g. ``[128, 64]``; empty for a linear model.
        num_classes: outputs of the last layer.

    Raises:
        ValueError: a size is not a positive integer.

    Example::

        >>> MLP(64, [128, 64], 10)(torch.zeros(5, 1, 8, 8)).shape
        torch.Size([5, 10])
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if isinstance(hidden, int):
            raise ValueError(f"`hidden` must be a list of widths, got the int {hidden}. Write `[{hidden}]`.")
        for name, value in (("in_features", in_features), ("num_classes", num_classes)):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}.")
        if any(h < 1 for h in hidden):
            raise ValueError(f"`hidden` widths must all be >= 1, got {list(hidden)}.")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
