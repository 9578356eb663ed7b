import torch

from secdfd.common.engine.ring import FixedPoint, lshr, msb
from secdfd.common.engine.sharing import reconstruct, share


def to_signed(v: int) -> int:
    """Python integer -> the int64 value representing it mod 2^64."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def to_unsigned(v: int) -> int:
    """int64 value -> its representative in [0, 2^64)."""
    return v & ((1 << 64) - 1)

EDGES = [0, 1, -1, 2**63 - 1, -(2**63), 2**62, -(2**62), 12345678901234567, -98765432109876543]


def test_wraparound_matches_python_integers():
    a = torch.tensor(EDGES, dtype=torch.int64)
    b = torch.tensor(EDGES[::-1], dtype=torch.int64)
    for op, pyop in ((torch.add, lambda x, y: x + y), (torch.sub, lambda x, y: x - y), (torch.mul, lambda x, y: x * y)):
        got = op(a, b).tolist()
        want = [to_signed(pyop(x, y)) for x, y in zip(EDGES, EDGES[::-1], strict=True)]
        assert got == want


def test_logical_shift_and_msb_match_unsigned_integers():
    a = torch.tensor(EDGES, dtype=torch.int64)
    for k in (1, 16, 40, 63):
        assert lshr(a, k).tolist() == [to_unsigned(x) >> k for x in EDGES]
    assert msb(a).tolist() == [to_unsigned(x) >> 63 for x in EDGES]


def test_fixed_point_roundtrip_and_rounding():
    fp = FixedPoint(16)
    x = torch.tensor([0.0, 1.5, -2.25, 1e-6, 3.0000076293945312, -12345.6789])
    enc = fp.encode(x)
    assert enc.tolist()[:3] == [0, 98304, -147456]
    assert (fp.decode(enc) - x.double()).abs().max().item() <= 2**-17 + 1e-12


def test_sharing_is_exact_and_masks_are_uniform_looking():
    x = torch.tensor(EDGES, dtype=torch.int64)
    a, b = share(x)
    assert torch.equal(reconstruct(a, b), x)
    big = torch.zeros(100_000, dtype=torch.int64)
    s0, _ = share(big)
    # each bit of a uniform share is 1 about half the time
    ones = ((s0[:, None] >> torch.arange(64)) & 1).double().mean(0)
    assert ((ones - 0.5).abs() < 0.01).all()
