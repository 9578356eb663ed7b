"""Ring products: the CPU's int64 convolution as a matrix product and the float64 limb path (what
CUDA uses) are bit-exact against torch's int64 convolution."""

import pytest
import torch
import torch.nn.functional as F

from secdfd.common.engine.prng import Stream, new_seed
from secdfd.common.engine.ringops import conv2d, limb_product, limb_product_split, split_limbs
from secdfd.common.engine.steps import _split_pays
from secdfd.common.engine.twoparty import TwoParty


@pytest.mark.parametrize(("shape", "out", "k", "stride", "padding", "dilation", "groups"), [
    ((1, 3, 16, 16), 8, (3, 3), 2, 0, 1, 1),  # a stem conv
    ((2, 8, 9, 9), 6, (3, 3), 2, 1, 1, 1),
    ((3, 4, 11, 7), 5, (1, 1), 2, 0, 1, 1),  # a strided 1x1 skip conv, odd sizes
    ((2, 5, 12, 12), 4, (3, 3), 1, 2, 2, 1),  # dilated
    ((2, 5, 13, 12), 4, (3, 2), 2, 1, 2, 1),  # a rectangular kernel, strided and dilated
    ((1, 2, 10, 10), 1, (7, 7), 1, 3, 1, 1),  # spatial attention's 7x7 conv on two maps
    ((4, 6, 8, 8), 7, (1, 1), 1, 0, 1, 1),  # pointwise, four crops
    ((2, 8, 9, 9), 6, (3, 3), 2, 1, 1, 2),  # grouped, not depthwise
    ((1, 12, 7, 7), 12, (1, 1), 1, 0, 1, 4),  # grouped pointwise
])
def test_int64_conv_as_matrix_product_is_exact(shape, out, k, stride, padding, dilation, groups):
    s = Stream(new_seed(), "c")
    w = s.ring((out, shape[1] // groups, *k))
    ref = lambda x: F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)  # noqa: E731
    x = s.ring(shape)
    assert torch.equal(conv2d(x, w, stride, padding, dilation, groups), ref(x))
    n, c, h, wd = shape
    xt = s.ring((n, wd, c, h)).permute(0, 2, 3, 1)  # a non-contiguous input
    assert torch.equal(conv2d(xt, w, stride, padding, dilation, groups), ref(xt))
    xs = s.ring((n, c + 2, h, wd))[:, 1 : c + 1]  # a view with a storage offset
    assert torch.equal(conv2d(xs, w, stride, padding, dilation, groups), ref(xs))


def test_limbs_only_where_asked_for():
    """On CPU every layer multiplies in int64 (no weight limbs kept); with limbs (CUDA) the dense
    layers split their weights, depthwise never."""
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.Conv2d(64, 64, 3, groups=64),
                            torch.nn.Conv2d(64, 8, 1))
    cpu, cuda = TwoParty(m, (1, 3, 8, 8)), TwoParty(m, (1, 3, 8, 8), limbs=True)
    assert cpu.parties[0].weights is not None and not cpu.parties[0].weights.limbs
    assert cuda.parties[0].weights is not None and len(cuda.parties[0].weights.limbs) == 4  # wb and F, 2 layers
    linear = [s for s in cpu.plan.steps if s.op == "linear"]
    assert [_split_pays(s, cuda.parties[0].ctx) for s in linear] == [True, False, True]


def test_limb_conv_and_matmul_are_exact():
    s = Stream(new_seed(), "l")
    x = s.ring((2, 8, 9, 9))
    w = s.ring((6, 8, 3, 3))
    conv = lambda a, b: F.conv2d(a, b, stride=2, padding=1)  # noqa: E731
    assert torch.equal(limb_product(conv, x, w, 8 * 9), conv(x, w))
    a, b = s.ring((5, 3224)), s.ring((7, 3224))
    mm = lambda p, q: p @ q.t()  # noqa: E731
    assert torch.equal(limb_product(mm, a, b, 3224), mm(a, b))
    # the CPU path: weights split once (float32 limbs), reused by every call
    wl = split_limbs(w)
    assert all(t.dtype == torch.float32 for t in wl)
    for _ in range(2):
        x = s.ring((2, 8, 9, 9))
        assert torch.equal(limb_product_split(conv, x, wl), conv(x, w))
    assert torch.equal(limb_product_split(mm, a, split_limbs(b)), mm(a, b))


def test_inexact_float_products_are_rounded_not_truncated():
    """A float64 product that lands just below (or above) an integer, as GPU conv algorithms return,
    still gives the exact ring product."""
    s = Stream(new_seed(), "r")
    x, w = s.ring((4, 64)), s.ring((3, 64))
    exact = x @ w.t()
    for eps in (-1e-7, 1e-7, -0.49, 0.49):
        def off(p: torch.Tensor, q: torch.Tensor, eps: float = eps) -> torch.Tensor:
            return p @ q.t() + eps  # every limb product misses its integer by eps

        assert torch.equal(limb_product(off, x, w, 64), exact)


def test_limb_reduction_limit():
    with pytest.raises(ValueError):
        limb_product(lambda p, q: p @ q.t(), torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.int64),
                     1 << 22)


def test_secure_inference_with_limbs_matches_int64_path():
    torch.manual_seed(0)
    nn = torch.nn
    m = nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 7 * 7, 2))
    x = torch.rand(1, 3, 16, 16)
    y_native, _ = TwoParty(m, (1, 3, 16, 16), limbs=False)(x)
    y_limbs, _ = TwoParty(m, (1, 3, 16, 16), limbs=True)(x)
    ref = m(x).double()
    assert (y_native - ref).abs().max() < 1e-3 and (y_limbs - ref).abs().max() < 1e-3


def test_low_products_keep_their_weights_converted_once():
    """A layer on a truncation's result multiplies the low 16 bits of its weight share in float64; that
    conversion is kept after the first request and the second request is as exact as the first."""
    torch.manual_seed(1)
    nn = torch.nn
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    tp = TwoParty(m, (1, 3, 8, 8))
    w = tp.parties[0].weights
    assert w is not None and not w.low
    for _ in range(2):
        x = torch.rand(1, 3, 8, 8)
        y, _ = tp(x)
        assert (y - m(x).double()).abs().max() < 1e-3
    assert sorted(w.low) == ["1.weight:16", "3.weight:16"]  # the layers after the first truncation
    for key, low in w.low.items():
        assert low.dtype == torch.float64
        assert torch.equal(low.to(torch.int64), w.wb[key.split(":")[0]] & 0xFFFF)
