"""DFDNet: Xception with CBAM in every block and multi-layer feature aggregation.

The architecture follows the published SecDFDNet PyTorch model (Chen, Liu, Xia, Zhao, Digital
Signal Processing 2023):

- stem: conv3x3/2 (no padding) + BN + ReLU, conv3x3 (no padding) + BN + ReLU, whose output is y1;
- 12 blocks (table `BLOCKS`): each rep is ReLU -> separable conv -> BN, strided blocks end with a
  3x3/2 max-pool, then ``x = CA(x)*x; x = SA(x)*x; x = x + skip``; y2, y3, y4 are the outputs of the
  first three blocks;
- exit: two separable convs + BN + ReLU, global average pool (2048 channels at full width);
- aggregation: avgpool(y1) | y2 -> avgpool | y3 -> avgpool | y4 -> global avgpool (1176 channels);
- head: [exit, aggregation] (3224) -> fc 2048 -> fc 2 (no activation between the two fcs).

Every layer is in the secure engine's supported set (Conv2d of any groups, BatchNorm2d, ReLU,
MaxPool2d, AvgPool2d, global avg/max pools, mean/amax over channels, Linear, Sigmoid, +, *, cat,
flatten), forwards have no data-dependent control flow and no in-place operations, so
`torch.fx.symbolic_trace` sees the whole graph. Attention gates are ordinary modules passed in as
factories, so a secure drop-in can replace them.

A width multiplier scales every channel count (and the hidden fc); the input size is a parameter
because the secure side plans memory and randomness from it. With ``folded=True`` every conv + BN
pair is a single conv with a bias: the form that `secdfd.common.ml.export` produces for the servers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from secdfd.common.errors import ModelError

GateFactory = Callable[[], nn.Module]

DEFAULT_SIZE = 128
MIN_SIZE = 32
MAX_SIZE = 1024


@dataclass(frozen=True)
class BlockSpec:
    """One Xception block: channels, separable-conv reps, stride and the published flags."""

    cin: int
    cout: int
    reps: int
    stride: int
    start_with_relu: bool = True
    grow_first: bool = True


# Channel counts are at full width; `DFDNet` scales them by its width multiplier.
BLOCKS: tuple[BlockSpec, ...] = (
    # entry flow
    BlockSpec(64, 128, 2, 2, start_with_relu=False),
    BlockSpec(128, 256, 2, 2),
    BlockSpec(256, 728, 2, 2),
    # middle flow
    *(BlockSpec(728, 728, 3, 1) for _ in range(8)),
    # exit flow
    BlockSpec(728, 1024, 2, 2, grow_first=False),
)
STEM = (32, 64)
EXIT = (1536, 2048)
HIDDEN = 2048
AGGREGATED = (0, 1, 2)  # y2, y3, y4 are the outputs of these blocks (y1 is the stem)
NUM_CLASSES = 2


def scaled(channels: int, width: float) -> int:
    """Channel count at a width multiplier (at least one channel)."""
    return max(1, round(channels * width))


class ConvNorm(nn.Module):
    """Conv followed by BatchNorm; once folded, one conv whose bias carries the BN."""

    def __init__(self, conv: nn.Conv2d, folded: bool) -> None:
        super().__init__()
        self.conv = conv
        self.bn = None if folded else nn.BatchNorm2d(conv.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x if self.bn is None else self.bn(x)


def conv_norm(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0,
              folded: bool = False) -> ConvNorm:
    """Plain conv + BN (no conv bias before a BN; a bias once the BN is folded in)."""
    return ConvNorm(nn.Conv2d(cin, cout, kernel, stride, padding, bias=folded), folded)


class SeparableConvNorm(nn.Module):
    """3x3 depthwise conv (no bias), then 1x1 pointwise conv + BN."""

    def __init__(self, cin: int, cout: int, folded: bool) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False)
        self.pointwise = conv_norm(cin, cout, 1, folded=folded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.pointwise(self.depthwise(x))
        return out


class ChannelAttention(nn.Module):
    """CBAM channel attention: gate(MLP(avgpool x) + MLP(maxpool x)), MLP shared, C -> C/16 -> C."""

    def __init__(self, channels: int, gate: GateFactory = nn.Sigmoid, ratio: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // ratio)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.max = nn.AdaptiveMaxPool2d(1)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(), nn.Conv2d(hidden, channels, 1, bias=False)
        )
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.gate(self.mlp(self.avg(x)) + self.mlp(self.max(x)))
        return out


class SpatialAttention(nn.Module):
    """CBAM spatial attention: gate(conv7x7([channel mean, channel max]))."""

    def __init__(self, gate: GateFactory = nn.Sigmoid, kernel: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([torch.mean(x, dim=1, keepdim=True), torch.amax(x, dim=1, keepdim=True)], dim=1)
        out: torch.Tensor = self.gate(self.conv(pooled))
        return out


class Block(nn.Module):
    """Xception block with CBAM: reps of (ReLU, separable conv, BN), max-pool if strided, CA, SA, skip."""

    def __init__(self, spec: BlockSpec, width: float, folded: bool, gate: GateFactory) -> None:
        super().__init__()
        cin, cout = scaled(spec.cin, width), scaled(spec.cout, width)
        # Channel widths of each rep: grow on the first rep, or on the last one (exit block).
        if spec.grow_first:
            widths = [(cin, cout)] + [(cout, cout)] * (spec.reps - 1)
        else:
            widths = [(cin, cin)] * (spec.reps - 1) + [(cin, cout)]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(widths):
            if i > 0 or spec.start_with_relu:
                layers.append(nn.ReLU())
            layers.append(SeparableConvNorm(a, b, folded))
        if spec.stride != 1:
            layers.append(nn.MaxPool2d(3, spec.stride, 1))
        self.rep = nn.Sequential(*layers)
        self.ca = ChannelAttention(cout, gate)
        self.sa = SpatialAttention(gate)
        changes = cin != cout or spec.stride != 1
        self.skip = conv_norm(cin, cout, 1, spec.stride, folded=folded) if changes else None

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.rep(inp)
        x = self.ca(x) * x
        x = self.sa(x) * x
        out: torch.Tensor = x + (inp if self.skip is None else self.skip(inp))
        return out


class Aggregation(nn.Module):
    """Multi-layer feature aggregation: pool y1, concat y2, pool, concat y3, pool, concat y4, global pool."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(3, 2, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, y1: torch.Tensor, y2: torch.Tensor, y3: torch.Tensor, y4: torch.Tensor) -> torch.Tensor:
        a = torch.cat([self.pool(y1), y2], dim=1)
        a = torch.cat([self.pool(a), y3], dim=1)
        a = torch.cat([self.pool(a), y4], dim=1)
        out: torch.Tensor = self.gap(a)
        return out


def check_size(size: int) -> int:
    """Return `size` if DFDNet accepts a size x size input, else raise ModelError."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ModelError(f"input size {size} is outside [{MIN_SIZE}, {MAX_SIZE}]; use 128 or 256")
    return size


class DFDNet(nn.Module):
    """One colour stream of the detector: (N, 3, size, size) -> two logits (real, fake)."""

    def __init__(self, width: float = 1.0, size: int = DEFAULT_SIZE, folded: bool = False,
                 gate: GateFactory = nn.Sigmoid) -> None:
        super().__init__()
        self.width = width
        self.input_size = check_size(size)
        self.folded = folded
        c1, c2 = (scaled(c, width) for c in STEM)
        e1, e2 = (scaled(c, width) for c in EXIT)
        self.stem1 = conv_norm(3, c1, 3, 2, folded=folded)
        self.stem2 = conv_norm(c1, c2, 3, folded=folded)
        self.relu = nn.ReLU()
        self.blocks = nn.ModuleList(Block(spec, width, folded, gate) for spec in BLOCKS)
        self.exit1 = SeparableConvNorm(scaled(BLOCKS[-1].cout, width), e1, folded)
        self.exit2 = SeparableConvNorm(e1, e2, folded)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.aggregate = Aggregation()
        aggregated = c2 + sum(scaled(BLOCKS[i].cout, width) for i in AGGREGATED)
        self.fc1 = nn.Linear(e2 + aggregated, scaled(HIDDEN, width))
        self.fc2 = nn.Linear(scaled(HIDDEN, width), NUM_CLASSES)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem1(x))
        y1 = x = self.relu(self.stem2(x))
        y2 = x = self.blocks[0](x)
        y3 = x = self.blocks[1](x)
        y4 = x = self.blocks[2](x)
        for block in self.blocks[3:]:
            x = block(x)
        x = self.relu(self.exit2(self.relu(self.exit1(x))))
        x = torch.cat([self.gap(x), self.aggregate(y1, y2, y3, y4)], dim=1)
        out: torch.Tensor = self.fc2(self.fc1(torch.flatten(x, 1)))
        return out


def init_weights(model: nn.Module) -> None:
    """He initialisation (fan-out) for convs and unit BN, as the published model does."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --- colour streams -------------------------------------------------------------------------

# ITU-R BT.601 full range (JPEG/JFIF) on values in [0, 1]: ycbcr = M @ rgb + t.
YCBCR_MATRIX = torch.tensor(
    [
        [0.299, 0.587, 0.114],
        [-0.168736, -0.331264, 0.5],
        [0.5, -0.418688, -0.081312],
    ],
    dtype=torch.float64,
)
YCBCR_OFFSET = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)

STREAMS = ("rgb", "ycbcr")


def rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    """Map an (N, 3, H, W) RGB batch in [0, 1] to YCbCr in [0, 1] (BT.601 full range)."""
    m = YCBCR_MATRIX.to(x.dtype)
    t = YCBCR_OFFSET.to(x.dtype)
    return torch.einsum("kc,nchw->nkhw", m, x) + t.view(1, 3, 1, 1)


def stream_input(x: torch.Tensor, stream: str) -> torch.Tensor:
    """The input a stream network is trained on, from an RGB batch in [0, 1]."""
    if stream == "rgb":
        return x
    if stream == "ycbcr":
        return rgb_to_ycbcr(x)
    raise ModelError(f"unknown stream {stream!r}; known: {', '.join(STREAMS)}")


class FusedDFDNet(nn.Module):
    """Late fusion of the two streams: RGB in [0, 1] -> fused fake probability (N, 1).

    Both streams read the same RGB tensor: the YCbCr map is folded into the YCbCr stream's first
    conv at export. A two-class softmax's fake probability is sigmoid(l_fake - l_real), so each
    stream's two logits are subtracted and gated, and the mean of the two probabilities is the
    output. The subtraction and the mean have fixed, public coefficients: they are local in the
    secure evaluation (no secret weights; the mean's 1/2 leaves one truncation of the output, as any
    fractional factor). Only supported operations, no softmax.
    """

    def __init__(self, rgb: DFDNet, ycbcr: DFDNet, gate: GateFactory = nn.Sigmoid) -> None:
        super().__init__()
        self.rgb = rgb
        self.ycbcr = ycbcr
        self.gate = gate()
        self.register_load_state_dict_pre_hook(_drop_fixed_head)  # type: ignore[no-untyped-call]

    def stream_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 2): the RGB stream's and the YCbCr stream's fake probabilities."""
        p_rgb = self.gate(_fake_minus_real(self.rgb(x)))
        p_ycc = self.gate(_fake_minus_real(self.ycbcr(x)))
        return torch.cat([p_rgb, p_ycc], dim=1)

    @staticmethod
    def fuse_probs(p: torch.Tensor) -> torch.Tensor:
        """(N, 2) stream probabilities -> (N, 1) their mean."""
        return (p[:, :1] + p[:, 1:]) * 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse_probs(self.stream_probs(x))


def _fake_minus_real(logits: torch.Tensor) -> torch.Tensor:
    """(N, 2) logits (real, fake) -> (N, 1) fake minus real."""
    return logits[:, 1:] - logits[:, :1]


# Files written before the fusion's fixed coefficients became local ops hold them as two Linear(2, 1)
# layers' weights; they load if those are exactly the fixed values, and are refused otherwise.
FIXED_HEAD = {"diff.weight": (-1.0, 1.0), "mean.weight": (0.5, 0.5)}


def _drop_fixed_head(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, *_: object) -> None:
    for key, want in FIXED_HEAD.items():
        value = state.get(prefix + key)
        if value is not None and torch.equal(value.detach().cpu().double().reshape(-1),
                                             torch.tensor(want, dtype=torch.float64)):
            del state[prefix + key]


# --- registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A named DFDNet variant."""

    name: str
    width: float
    description: str


MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a variant to the registry; a name can be registered only once."""
    if spec.name in MODELS:
        raise ModelError(f"model {spec.name!r} is already registered")
    MODELS[spec.name] = spec
    return spec


register(ModelSpec("dfdnet", 1.0, "full width, as published (about 28.15 M parameters)"))
register(ModelSpec("dfdnet-s", 0.25, "quarter width: the embedded default and the tests"))


def get_spec(name: str) -> ModelSpec:
    """The registered variant called `name`; unknown names raise ModelError listing the known ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None


def build_model(name: str, size: int = DEFAULT_SIZE, folded: bool = False,
                gate: GateFactory = nn.Sigmoid) -> DFDNet:
    """One stream network of the named variant for size x size inputs."""
    return DFDNet(get_spec(name).width, size, folded, gate)


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
