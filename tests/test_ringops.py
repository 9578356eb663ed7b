"""The float64 limb path (what CUDA uses) is bit-exact against int64 on CPU."""

import pytest
import torch
import torch.nn.functional as F

from secdfd.common.engine.prng import Stream, new_seed
from secdfd.common.engine.ringops import limb_product, limb_product_split, split_limbs
from secdfd.common.engine.twoparty import TwoParty


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
