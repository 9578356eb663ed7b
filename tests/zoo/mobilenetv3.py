"""A MobileNetV3 inverted residual with Hardswish and a Hardsigmoid squeeze-excitation, as in
torchvision.models.mobilenetv3 (Conv2dNormActivation, SqueezeExcitation, `result += input`)."""

import torch.nn.functional as F
from torch import nn

INPUT = (1, 16, 12, 12)


def _make_divisible(v, divisor, min_value=None):
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNActivation(nn.Sequential):
    def __init__(self, in_planes, out_planes, kernel_size=3, stride=1, groups=1, activation_layer=None):
        padding = (kernel_size - 1) // 2
        layers = [nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
                  nn.BatchNorm2d(out_planes, eps=0.001, momentum=0.01)]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, input_channels, squeeze_factor=4):
        super().__init__()
        squeeze_channels = _make_divisible(input_channels // squeeze_factor, 8)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)

    def _scale(self, input, inplace):
        scale = F.adaptive_avg_pool2d(input, 1)
        scale = self.fc1(scale)
        scale = self.relu(scale)
        scale = self.fc2(scale)
        return F.hardsigmoid(scale, inplace=inplace)

    def forward(self, input):
        scale = self._scale(input, True)
        return scale * input


class InvertedResidual(nn.Module):
    def __init__(self, input_channels, kernel, expanded_channels, out_channels, use_se, use_hs, stride):
        super().__init__()
        self.use_res_connect = stride == 1 and input_channels == out_channels
        layers = []
        activation_layer = nn.Hardswish if use_hs else nn.ReLU
        if expanded_channels != input_channels:
            layers.append(ConvBNActivation(input_channels, expanded_channels, kernel_size=1,
                                           activation_layer=activation_layer))
        layers.append(ConvBNActivation(expanded_channels, expanded_channels, kernel_size=kernel, stride=stride,
                                       groups=expanded_channels, activation_layer=activation_layer))
        if use_se:
            layers.append(SqueezeExcitation(expanded_channels))
        layers.append(ConvBNActivation(expanded_channels, out_channels, kernel_size=1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, input):
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


def build():
    return InvertedResidual(16, 5, 32, 16, use_se=True, use_hs=True, stride=1).eval()
