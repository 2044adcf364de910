"""A small model zoo for the tests and benchmarks: torchvision's ResNet-18/50, MobileNetV2 and
VGG-11 written out compactly (torchvision is not a dependency), with the same module structure
and forward code, so ``torch.fx`` traces them as it traces torchvision's; and a small U-Net with
transposed convolutions and concatenation. ``width`` divides every channel count (1: the real
sizes); weights are random (``seed``), BatchNorm statistics are drawn so that folding matters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Running statistics and affine parameters drawn at random (a trained-looking BN)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


# -- ResNet -------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:  # fmt: skip
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:  # fmt: skip
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int],
                 num_classes: int = 1000, width: int = 1) -> None:  # fmt: skip
        super().__init__()
        self.inplanes = 64 // width
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64 // width, layers[0])
        self.layer2 = self._make_layer(block, 128 // width, layers[1], 2)
        self.layer3 = self._make_layer(block, 256 // width, layers[2], 2)
        self.layer4 = self._make_layer(block, 512 // width, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 // width * block.expansion, num_classes)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:  # fmt: skip
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(width: int = 1, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes, width)
    return _randomise_bn(model, torch.Generator().manual_seed(seed)).eval()


def resnet50(width: int = 1, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ResNet(Bottleneck, [3, 4, 6, 3], num_classes, width)
    return _randomise_bn(model, torch.Generator().manual_seed(seed)).eval()


# -- MobileNetV2 --------------------------------------------------------------------------------


class Conv2dNormActivation(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, activation: bool = True) -> None:  # fmt: skip
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                      bias=False),
            nn.BatchNorm2d(cout),
        ]  # fmt: skip
        if activation:
            layers.append(nn.ReLU6(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden, 1))
        layers += [
            Conv2dNormActivation(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width: int = 1) -> None:
        super().__init__()
        settings = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
                    [6, 160, 3, 2], [6, 320, 1, 1]]  # fmt: skip
        cin, last = max(32 // width, 1), max(1280 // width, 1)
        features: list[nn.Module] = [Conv2dNormActivation(3, cin, stride=2)]
        for t, c, n, s in settings:
            cout = max(c // width, 1)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(Conv2dNormActivation(cin, last, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(width: int = 1, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = MobileNetV2(num_classes, width)
    return _randomise_bn(model, torch.Generator().manual_seed(seed)).eval()


# -- VGG ----------------------------------------------------------------------------------------


class VGG(nn.Module):
    def __init__(self, features: nn.Module, num_classes: int = 1000, width: int = 1,
                 hidden: int = 4096) -> None:  # fmt: skip
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 // width * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg11(width: int = 1, num_classes: int = 1000, seed: int = 0, hidden: int = 4096) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    cin = 3
    for v in [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, int(v) // width, 3, padding=1), nn.ReLU(True)]
            cin = int(v) // width
    return VGG(nn.Sequential(*layers), num_classes, width, hidden).eval()


# -- U-Net --------------------------------------------------------------------------------------


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True),
    )  # fmt: skip


class UNet(nn.Module):
    """Two down steps (max pooling), two up steps (ConvTranspose2d, concatenation with the
    skip connection)."""

    def __init__(self, cin: int = 3, classes: int = 2, base: int = 16) -> None:
        super().__init__()
        self.inc = _double_conv(cin, base)
        self.down1 = nn.Sequential(nn.MaxPool2d(2), _double_conv(base, 2 * base))
        self.down2 = nn.Sequential(nn.MaxPool2d(2), _double_conv(2 * base, 4 * base))
        self.up1 = nn.ConvTranspose2d(4 * base, 2 * base, 2, stride=2)
        self.conv1 = _double_conv(4 * base, 2 * base)
        self.up2 = nn.ConvTranspose2d(2 * base, base, 2, stride=2)
        self.conv2 = _double_conv(2 * base, base)
        self.outc = nn.Conv2d(base, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        y = self.conv1(torch.cat([x2, self.up1(x3)], dim=1))
        y = self.conv2(torch.cat([x1, self.up2(y)], dim=1))
        return self.outc(y)


def unet(base: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = UNet(3, 2, base)
    return _randomise_bn(model, torch.Generator().manual_seed(seed)).eval()


ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18, "resnet50": resnet50, "mobilenet_v2": mobilenet_v2,
    "vgg11": vgg11, "unet": unet,
}  # fmt: skip
