"""The entry flow of the FaceForensics++ Xception (ondyari/FaceForensics, network/xception.py after
Cadene's pretrainedmodels): stem convs, and blocks 1-3 with separable convs, one shared in-place ReLU
module, max-pools and `x += skip`. Widths divided by 8 for the test."""

from torch import nn

INPUT = (1, 3, 35, 35)


class SeparableConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, padding=0, dilation=1, bias=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size, stride, padding, dilation, groups=in_channels,
                               bias=bias)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, 1, 0, 1, 1, bias=bias)

    def forward(self, x):
        x = self.conv1(x)
        x = self.pointwise(x)
        return x  # noqa: RET504 - the upstream spelling


class Block(nn.Module):
    def __init__(self, in_filters, out_filters, reps, strides=1, start_with_relu=True, grow_first=True):
        super().__init__()
        if out_filters != in_filters or strides != 1:
            self.skip = nn.Conv2d(in_filters, out_filters, 1, stride=strides, bias=False)
            self.skipbn = nn.BatchNorm2d(out_filters)
        else:
            self.skip = None

        self.relu = nn.ReLU(inplace=True)
        rep = []

        filters = in_filters
        if grow_first:
            rep.append(self.relu)
            rep.append(SeparableConv2d(in_filters, out_filters, 3, stride=1, padding=1, bias=False))
            rep.append(nn.BatchNorm2d(out_filters))
            filters = out_filters

        for _i in range(reps - 1):
            rep.append(self.relu)
            rep.append(SeparableConv2d(filters, filters, 3, stride=1, padding=1, bias=False))
            rep.append(nn.BatchNorm2d(filters))

        if not grow_first:
            rep.append(self.relu)
            rep.append(SeparableConv2d(in_filters, out_filters, 3, stride=1, padding=1, bias=False))
            rep.append(nn.BatchNorm2d(out_filters))

        if not start_with_relu:
            rep = rep[1:]
        else:
            rep[0] = nn.ReLU(inplace=False)

        if strides != 1:
            rep.append(nn.MaxPool2d(3, strides, 1))
        self.rep = nn.Sequential(*rep)

    def forward(self, inp):
        x = self.rep(inp)

        if self.skip is not None:
            skip = self.skip(inp)
            skip = self.skipbn(skip)
        else:
            skip = inp

        x += skip
        return x


class EntryFlow(nn.Module):
    def __init__(self, w=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32 // w, 3, 2, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(32 // w)
        self.relu = nn.ReLU(inplace=True)

        self.conv2 = nn.Conv2d(32 // w, 64 // w, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(64 // w)

        self.block1 = Block(64 // w, 128 // w, 2, 2, start_with_relu=False, grow_first=True)
        self.block2 = Block(128 // w, 256 // w, 2, 2, start_with_relu=True, grow_first=True)
        self.block3 = Block(256 // w, 728 // w, 2, 2, start_with_relu=True, grow_first=True)

    def features(self, input):
        x = self.conv1(input)
        x = self.bn1(x)
        x = self.relu(x)

        x = self.conv2(x)
        x = self.bn2(x)
        x = self.relu(x)

        x = self.block1(x)
        x = self.block2(x)
        x = self.block3(x)
        return x  # noqa: RET504 - the upstream spelling

    def forward(self, input):
        return self.features(input)


def build():
    return EntryFlow().eval()
