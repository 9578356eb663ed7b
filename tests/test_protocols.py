"""Every protocol on random inputs with edge values: exact results or error bounds, plus the bytes
and rounds each one costs."""

import pytest
import torch
import torch.nn.functional as F

from secdfd.common.engine.driver import gather
from secdfd.common.engine.prng import Stream, new_seed
from secdfd.common.engine.protocols import arith, compare, pool, sigmoid, spline
from secdfd.common.engine.ring import FixedPoint, lshr

L = 40


def _rand_ring(n: int, bits: int) -> torch.Tensor:
    """Uniform signed values with |x| < 2^bits from the CSPRNG."""
    r = Stream(new_seed(), "t").ring((n,))
    return (r >> (64 - bits - 1))


def test_mul_exact_with_broadcast(run2, fp):
    a = Stream(new_seed(), "m").ring((2, 3, 4, 4))
    b = Stream(new_seed(), "n").ring((2, 3, 1, 1))

    def proto(c, R, x):
        y = b if c.party == 0 else torch.zeros_like(b)
        return (yield from arith.mul(c, x, y, R))

    out, fig = run2(lambda s: arith.deal_mul(s, a.shape, b.shape), proto, a)
    assert torch.equal(out, a * b)
    assert fig["rounds"] == 1
    assert fig["bytes_per_party"][0] == 8 * (a.numel() + b.numel())


def test_truncation_never_off_by_more_than_one_ulp(run2):
    # 10^7 elements with magnitudes up to 2^40 ring units: each result is floor(x / 2^16), one more or
    # one less; each party sends only the 48 bits above the shift.
    n = 10_000_000
    x = _rand_ring(n, 40)
    x[:6] = torch.tensor([0, 1, -1, 2**40 - 1, -(2**40), 65535])
    out, fig = run2(lambda s: arith.deal_trunc(s, n, 16), lambda c, R, v: arith.trunc(c, v, R, 16), x)
    diff = out - (x >> 16)
    assert int(diff.min()) >= -1 and int(diff.max()) <= 1
    assert fig["rounds"] == 1 and fig["bytes_per_party"][0] == 6 * n


def test_truncation_at_the_edge_of_its_range(run2):
    x = torch.tensor([2**61, -(2**61), 2**62 - 2**20, -(2**62) + 2**20], dtype=torch.int64)
    out, fig = run2(lambda s: arith.deal_trunc(s, 4, 20), lambda c, R, v: arith.trunc(c, v, R, 20), x)
    diff = out - (x >> 20)
    assert int(diff.min()) >= -1 and int(diff.max()) <= 1
    assert fig["bytes_per_party"][0] == 6 * 4  # 44 bits, in 6 bytes


@pytest.mark.parametrize("where", ["msb", "wrap"])
def test_truncation_where_the_dropped_carry_would_flip_the_top_bit(run2, where):
    # Each party sends only the bits above the shift; their sum misses the carry of the low bits. Where
    # that carry would flip msb(c) (or wrap to 0), a second round opens those elements' low bits and the
    # result is still within one unit. The masks are chosen here to force the case.
    k, n = 16, 6
    # near -2^62 (y = x + 2^62 close to 0) the wrong top bit would cost 2^48 units, not one
    x = torch.tensor([5 << 16, -(7 << 16), 123, -1, -(2**62) + 1, -(2**62) + 3], dtype=torch.int64)
    y = x + (1 << arith.OFFSET_BITS)
    target = (1 << 63) if where == "msb" else 0  # c lands just at the top bit's (or the ring's) edge
    r = target + 3 - y  # c = y + r = target + 3: the high part is 2^47 (or 0), the low bits 3
    x0 = Stream(new_seed(), "x0").ring((n,))
    xs = (x0, x - x0)  # the parties' shares of x, chosen here (the proto ignores run2's own sharing)
    r0 = (torch.full((n,), (1 << 16) - 1) - (x0 + (1 << arith.OFFSET_BITS))) & ((1 << 16) - 1)
    r0 = r0 + (Stream(new_seed(), "h").ring((n,)) << 16)  # low bits of y0 + r0 all ones: a carry
    r1 = r - r0
    s, m = lshr(r, k), lshr(r, 63)

    def deal(src):
        if src.is_dealer:
            return None
        p = 0 if src.role == 0 else 1
        s0 = Stream(b"\x01" * 32, "s").ring((n,))
        m0 = Stream(b"\x02" * 32, "m").ring((n,))
        return arith.MaskRand([r0, r1][p], [s0, s - s0][p], [m0, m - m0][p], None, k)

    def proto(c, R, v):
        return (yield from arith.trunc(c, xs[c.party], R, k))

    out, fig = run2(deal, proto, x)
    diff = out - (x >> k)
    assert int(diff.min()) >= -1 and int(diff.max()) <= 1
    assert fig["rounds"] == 2
    assert fig["bytes_per_party"][0] == 6 * n + 8 * n  # every element sits at the edge here


@pytest.mark.parametrize("shift", [0, 16])
def test_relu_exact_including_edges(run2, shift):
    n = 50_000
    x = _rand_ring(n, L + shift - 1)
    edges = [0, 1, -1, 2**L - 1, -(2**L) + 1, 2**(L - 1), -(2**(L - 1))]
    x[: len(edges)] = torch.tensor(edges) << shift
    out, fig = run2(lambda s: compare.deal_relu(s, n, shift, L), lambda c, R, v: compare.relu(c, v, R, shift), x)
    want = (x >> shift).clamp(min=0)
    if shift:
        d = out - want  # the fused truncation may be one unit off (never to a negative input's zero)
        assert int(d.min()) >= -1 and int(d.max()) <= 1
    else:
        assert torch.equal(out, want)
    assert fig["rounds"] == 3  # open, the comparison tree (one round), inject
    assert fig["bytes_per_party"][0] / n <= 11
    # the one-round tree costs the dealer 514 bits per comparison at 40 bits (161 in two rounds); the
    # mask, its bit planes and the injection's shares at most 34 bytes more
    assert compare.tree_dealt_bits(L) == 514 and compare.tree_dealt_bits(32) == 301
    assert (compare.tree_bits(L), compare.tree_rounds(L)) == (12, 1) and compare.leaf_groups(32) == (6, 6, 5, 5, 5, 5)
    assert fig["dealer_bytes"] / n <= 34 + compare.tree_dealt_bits(L) / 8


def test_sign_of_values_near_zero(run2):
    # x - t for t around x: exactly the comparisons that max and sigmoid rely on.
    x = torch.arange(-300, 300, dtype=torch.int64)

    def proto(c, R, v):
        m = yield from arith.mask_open(c, v, R.mask, 0)
        b = yield from compare.sign(c, m, R.cmp)
        return (yield from compare.bit_to_arith(c, b, R.inj, v.numel()))

    def deal(s):
        mask = arith.deal_mask(s, 600, 0, L + 1)
        cmp = compare.deal_compare(s, mask.sbits, 600, L)
        return compare.ReluRand(mask, cmp, compare.deal_inject(s, 600, None, False))

    out, _ = run2(deal, proto, x)
    assert torch.equal(out, (x >= 0).long())


BOUND = 1 << 16  # a lower bound than the deployed one (2^20), so that both shapes run quickly


@pytest.mark.parametrize("L", [32, 40])
@pytest.mark.parametrize("n", [BOUND, BOUND + 64])
def test_comparison_tree_one_round_up_to_its_bound_then_two(run2, n, L, monkeypatch):
    """Both tree shapes, exact, at the bound that chooses between them: rounds and bits as the cost
    model says (open, tree, bit to arithmetic: 3 rounds and 10 or 12 tree bits per comparison; 4
    rounds and 16 or 21 bits beyond). Dealer and parties read the bound when they run."""
    monkeypatch.setattr(compare, "ONE_ROUND_MAX", BOUND)
    x = _rand_ring(n, L - 1)
    x[:600] = torch.arange(-300, 300, dtype=torch.int64)  # near zero: every borrow chain

    def proto(c, R, v):
        m = yield from arith.mask_open(c, v, R.mask, 0)
        b = yield from compare.sign(c, m, R.cmp)
        return (yield from compare.bit_to_arith(c, b, R.inj, n))

    def deal(s):
        mask = arith.deal_mask(s, n, 0, L + 1)
        return compare.ReluRand(mask, compare.deal_compare(s, mask.sbits, n, L), compare.deal_inject(s, n, None, False))

    out, fig = run2(deal, proto, x, 16, L)
    assert torch.equal(out, (x >= 0).long())
    one = n <= compare.ONE_ROUND_MAX
    assert compare.tree_rounds(L, n) == (1 if one else 2)
    assert compare.tree_bits(L, n) == {(32, True): 10, (40, True): 12, (32, False): 16, (40, False): 21}[(L, one)]
    assert fig["rounds"] == 2 + compare.tree_rounds(L, n)
    assert fig["bytes_per_party"][0] == arith.open_nbytes(0, n) + n * (compare.tree_bits(L, n) + 1) // 8


def _conv_cases(groups: int):
    """(input shape, weight shape, ring op): a strided 3x3 conv, a depthwise conv, and a 1x1 conv
    with `groups` groups."""
    from secdfd.common.engine.steps import depthwise

    cases = [
        ((1, 4, 9, 9), (6, 4, 3, 3), dict(stride=2, padding=1, groups=1)),
        ((1, 4, 9, 9), (4, 1, 3, 3), dict(stride=1, padding=1, groups=4)),
        ((2, 4, 5, 5), (8, 4 // groups, 1, 1), dict(stride=1, padding=0, groups=groups)),
    ]
    out = []
    for xshape, wshape, kw in cases:
        if kw["groups"] == xshape[1] and wshape[1] == 1:
            op = lambda a, w, kw=kw: depthwise(a, w, kw["stride"], kw["padding"], 1)  # noqa: E731
        else:
            op = lambda a, w, kw=kw: F.conv2d(a, w, **kw)  # noqa: E731
        out.append((xshape, wshape, op))
    return out


def test_linear_layers_with_secret_weights_exact(run2):
    s = Stream(new_seed(), "w")
    for xshape, wshape, op in _conv_cases(groups=2):
        x = s.ring(xshape)
        W = s.ring(wshape)
        B = s.ring(wshape)
        Fw = W - B
        B0 = s.ring(wshape)
        B1 = B - B0
        out_shape = tuple(op(x, W).shape)

        def deal(src, op=op, B=B, xshape=xshape, out_shape=out_shape):
            return arith.deal_linear(src, xshape, out_shape, op, B if src.is_dealer else None)

        def proto(c, R, v, op=op, B0=B0, B1=B1, Fw=Fw):
            R = arith.prepare_linear(R, op, Fw)
            wb = Fw + B0 if c.party == 0 else B1
            return (yield from arith.linear(c, v, R, lambda e: op(e, wb)))

        out, fig = run2(deal, proto, x)
        assert torch.equal(out, op(x, W))
        assert fig["rounds"] == 1 and fig["bytes_per_party"][0] == 8 * x.numel()


def test_maxpool_exact_with_ties_and_padding(run2, fp):
    x = fp.encode(torch.randn(1, 3, 11, 10) * 5)
    x[0, 0, :3, :3] = 7  # ties
    x[0, 1] = 0
    out, fig = run2(lambda s: pool.deal_maxpool(s, tuple(x.shape), 3, 2, 1, L),
                    lambda c, R, v: pool.maxpool2d(c, v, R, 3, 2, 1), x)
    assert torch.equal(out, F.max_pool2d(x.double(), 3, 2, 1).long())
    assert fig["rounds"] == 8  # rows then columns, max of 3 each: open, tree, selector AND, inject


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 700])
def test_reduce_max_exact(run2, fp, n):
    x = fp.encode(torch.randn(3, n) * 100)
    x[1] = 5  # all equal
    out, fig = run2(lambda s: pool.deal_reduce_max(s, 3, n, L), lambda c, R, v: pool.reduce_max(c, v, R), x)
    assert torch.equal(out.reshape(3), x.max(-1).values)
    assert fig["rounds"] == sum(3 if k == 2 else 4 for k in pool.reduce_plan(n, 3))


@pytest.mark.parametrize("n", [6, 8, 12])
def test_max_wide_exact_bytes_and_rounds(run2, fp, n):
    """One layer of max-of-n: an 8-byte opening per value (not per pair), then n(n-1)/2 pairs per row,
    each with its 12 tree bits and one selector bit (the fan-in AND opens every pair bit once), and
    n-1 injected bits."""
    rows = 128
    x = fp.encode(torch.randn(rows, n) * 100)
    x[1] = 5  # all equal
    x[2, 1] = x[2, 3] = x[2].max() + 1  # a tie at the top
    x[3, n - 1] = x[3].max() + 1  # the last one wins
    x[4, 0] = x[4].max() + 1  # the first one wins
    dealt = []
    out, fig = run2(lambda s: dealt.append(pool.deal_reduce_max(s, rows, n, L)) or dealt[-1],
                    lambda c, R, v: pool.reduce_max(c, v, R), x)
    assert torch.equal(out.reshape(rows), x.max(-1).values)
    npairs = n * (n - 1) // 2
    assert fig["rounds"] == 4
    # bits travel packed, 64 to a word: rows // 8 bytes per bit-per-row
    bits = npairs * compare.tree_bits(L) + npairs + (n - 1)
    assert fig["bytes_per_party"][0] == 8 * rows * n + rows // 8 * bits
    # the selectors' monomials, as the plan counts them: 840 per row at n = 8, 22,396 at 12
    monomials = {6: 130, 8: 840, 12: 22_396}[n]
    (R,) = dealt[-1]
    assert R.sel_mono is not None and tuple(R.sel_mono.shape) == (monomials, rows // 64)
    assert pool.layer_dealt(rows, n, n) == 8 * R.sel_mono.numel() == monomials * rows // 8


def test_reduce_plan_weighs_bytes_against_rounds(monkeypatch):
    # CBAM in a middle block of DFDNet at 128 px: the spatial max (728 rows of 64) and the channel max
    # (64 rows of 728); max-of-4 layers took 15 and 25 rounds with two-round comparison trees, and
    # 11 and 15 while a layer opened its differences (2, 4, 8 and 2, 4, 8, 12): opening each value
    # once makes wide layers cheap in bytes
    assert pool.reduce_plan(64, 728) == [8, 8] and pool._best_plan(728, 64)[0][2] == 8
    assert pool.reduce_plan(728, 64) == [7, 9, 12] and pool._best_plan(64, 728)[0][2] == 12
    # one row (64 padded): 8 bytes per opened element; per pair 12 tree bits and a selector bit
    assert [pool.layer_cost(1, 8, k)[0] for k in (3, 4, 12)] == [8 * 64 * 3 + 8 * (3 * 13 + 2),
                                                                 8 * 64 * 4 + 8 * (6 * 13 + 3),
                                                                 8 * 64 * 12 + 8 * (66 * 13 + 11)]
    assert [pool.layer_rounds(k) for k in (2, 3, 8)] == [3, 4, 4] and pool.layer_rounds(8, kept=True) == 3
    assert pool.reduce_plan(3, 63488) == [3] and pool.reduce_plan(2) == [2]
    for rows, n in ((728, 64), (64, 728), (3, 700)):
        ks = pool.reduce_plan(n, rows)
        b, r, m = 0, 0, n
        for k in ks:
            lb, lr = pool.layer_cost(rows, m, k)
            b, r, m = b + lb, r + lr, (m + k - 1) // k
        assert m == 1 and pool._best_plan(rows, n)[0][1:] == (b, r)
    # over a truncation's result the first layer opens nothing
    assert pool.reduce_plan(64, 728, kept=True) == [8, 8] and pool._best_plan(728, 64, True)[0][2] == 7
    # CBAM's channel max in a middle block: 11 rounds with a max-of-12 layer, 14 with layers up to 8
    assert pool.reduce_plan(728, 64, kept=True) == [7, 9, 12]
    assert pool._best_plan(64, 728, True)[0][2] == 11
    assert _plan_with(monkeypatch, 728, 64, MAX_ARITY=8)[0][2] == 14
    # the dealt monomials keep wide layers where they buy little: a channel max over 256 channels at
    # 128 positions would save one round for 4.1 MB more dealt with no weight on them
    assert pool.reduce_plan(256, 128, kept=True) == [4, 8, 8]
    (_, _, rounds), ks = _plan_with(monkeypatch, 256, 128, DEALT_WEIGHT=0)
    assert ks == (11, 2, 12) and rounds == 10
    extra = sum(pool.layer_dealt(128, m, k) for m, k in ((256, 11), (24, 2), (12, 12)))
    extra -= sum(pool.layer_dealt(128, m, k) for m, k in ((256, 4), (64, 8), (8, 8)))
    assert extra == 4_115_008  # bytes, for one round


def _plan_with(monkeypatch, n, rows, **settings):
    """`_best_plan` of a kept reduction under other pool settings (restored after)."""
    try:
        with monkeypatch.context() as m:
            for k, v in settings.items():
                m.setattr(pool, k, v)
            pool._best_plan.cache_clear()
            return pool._best_plan(rows, n, True)
    finally:
        pool._best_plan.cache_clear()


def test_sigmoid_error_bound(run2, fp):
    x = torch.cat([torch.linspace(-60, 60, 120_001, dtype=torch.float64),
                   torch.tensor([1e4, -1e4, 0.0, 10.0, -10.0, 1e-5], dtype=torch.float64)])
    n = x.numel()
    out, fig = run2(lambda s: sigmoid.deal_sigmoid(s, n, 0, 16, L), lambda c, R, v: sigmoid.sigmoid(c, v, R, 0),
                    fp.encode(x))
    err = (fp.decode(out) - torch.sigmoid(x)).abs().max().item()
    assert err <= 2e-4
    # 15 x 120k comparisons: beyond compare.ONE_ROUND_MAX, the tree takes two rounds (4 below it)
    assert fig["rounds"] == 5
    # the float model of the piecewise cubic is itself within 5e-5
    assert (sigmoid.reference(x) - torch.sigmoid(x)).abs().max().item() < 5e-5


def test_gather_batches_rounds(run2):
    n = 1000
    x = _rand_ring(n, 30)

    def deal(s):
        return [compare.deal_relu(s.child("a"), n, 0, L), compare.deal_relu(s.child("b"), n, 0, L)]

    def proto(c, R, v):
        a, b = yield from gather([compare.relu(c, v, R[0], 0), compare.relu(c, -v, R[1], 0)])
        return a - b

    out, fig = run2(deal, proto, x)
    assert torch.equal(out, x)  # relu(x) - relu(-x) = x
    assert fig["rounds"] == 3  # two ReLUs side by side cost the rounds of one


def test_logical_shift_helper():
    assert lshr(torch.tensor([-1]), 60).item() == 15
    assert FixedPoint(16).scale == 65536


def _trunc_then(consumer_deal, consumer_run, x, k):
    """Deal and run a truncation by k whose result a consumer reuses; the reconstructed output is the
    truncation's value (flat) followed by the consumer's (flat)."""
    n = x.numel()

    def deal(s):
        M = arith.deal_trunc(s.child("t"), n, k)
        return M, consumer_deal(s.child("c"), M)

    def proto(c, R, v):
        M, Rc = R
        t = yield from arith.trunc_kept(c, v, M, k)
        z = yield from consumer_run(c, t, Rc)
        return torch.cat([t.shares.reshape(-1), z.reshape(-1)])

    return deal, proto


@pytest.mark.parametrize("k", [16, 24])
def test_linear_reusing_a_truncation_is_exact_and_opens_k_bits(run2, k):
    # conv 3x3, depthwise and 1x1: the layer's output is exactly op(X, W) for the truncated X, and
    # its input costs k/8 bytes per element (int16 for k = 16, int32 for 24) instead of 8.
    s = Stream(new_seed(), "w")
    for xshape, wshape, op in _conv_cases(groups=1):
        x = (s.ring(xshape) >> 20)  # |x| < 2^43
        W, B = s.ring(wshape), s.ring(wshape)
        Fw, B0 = W - B, s.ring(wshape)
        B1 = B - B0
        reduction = wshape[1] * wshape[2] * wshape[3]

        def low(e, w, op=op, reduction=reduction):
            if reduction << (2 * k) > 1 << 53:
                return op(e, w)
            return torch.round(op(e.double(), (w & ((1 << k) - 1)).double())).long()

        out_shape = tuple(op(x, W).shape)

        def cdeal(src, M, op=op, B=B, xshape=xshape, out_shape=out_shape):
            return arith.deal_trunc_linear(src, M, xshape, out_shape, op, B if src.is_dealer else None)

        def crun(c, t, R, op=op, low=low, B0=B0, B1=B1, Fw=Fw):
            R = arith.prepare_trunc_linear(R, op, Fw)
            wb = Fw + B0 if c.party == 0 else B1
            return (yield from arith.trunc_linear(c, t, R, lambda e: op(e, wb), lambda e: low(e, wb)))

        deal, proto = _trunc_then(cdeal, crun, x, k)
        out, fig = run2(deal, proto, x)
        X, Z = out[: x.numel()].reshape(xshape), out[x.numel():].reshape(out_shape)
        d = X - (x >> k)
        assert int(d.min()) >= -1 and int(d.max()) <= 1
        assert torch.equal(Z, op(X, W))
        assert fig["rounds"] == 2
        assert fig["bytes_per_party"][0] == arith.open_nbytes(k, x.numel()) + {16: 2, 24: 4}[k] * x.numel()


@pytest.mark.parametrize("k", [16, 32])
def test_product_reusing_a_truncation_is_exact_and_opens_k_bits(run2, k):
    # k = 32: a sigmoid's last truncation (`sigmoid.sigmoid_kept`) times a value of another step
    s = Stream(new_seed(), "p")
    x = s.ring((2, 3, 4, 4)) >> 20
    y = s.ring((2, 3, 1, 1))  # a gate broadcast over the feature map

    def crun(c, t, R):
        yv = y if c.party == 0 else torch.zeros_like(y)
        return (yield from arith.trunc_mul(c, t, yv, R))

    deal, proto = _trunc_then(lambda src, M: arith.deal_trunc_mul(src, M, x.shape, y.shape), crun, x, k)
    out, fig = run2(deal, proto, x)
    X, Z = out[: x.numel()].reshape(x.shape), out[x.numel():].reshape(x.shape)
    assert torch.equal(Z, X * y)
    assert fig["rounds"] == 2
    assert fig["bytes_per_party"][0] == arith.open_nbytes(k, x.numel()) + k // 8 * x.numel() + 8 * y.numel()


@pytest.mark.parametrize("gate", ["trunc", "sigmoid"])
def test_product_of_two_truncations_takes_no_round_and_no_byte(run2, fp, gate):
    """A feature map X from a truncation times a gate G from a truncation (k = 16) or a sigmoid (its
    last truncation, k = 32), broadcast: exactly X * G in the ring, with the producers' rounds and
    bytes only (`arith.kept_mul` opens nothing)."""
    x = Stream(new_seed(), "pp").ring((2, 3, 4, 4)) >> 20  # at 2f, truncated by f
    g = fp.encode(torch.randn(2, 3, 1, 1) * 4)
    g = g << 16 if gate == "trunc" else g
    gshape, n, ng = (2, 3, 1, 1), x.numel(), g.numel()

    def deal(src):
        M = arith.deal_trunc(src.child("t"), n, 16)
        if gate == "trunc":
            G = Mg = arith.deal_trunc(src.child("g"), ng, 16)
        else:
            G = sigmoid.deal_sigmoid(src.child("g"), ng, 0, 16, L)
            Mg = spline.kept_mask(G, ng)
        return M, G, arith.deal_kept_mul(src.child("c"), M, Mg, tuple(x.shape), gshape)

    def producers(c, R, v):
        M, G, _ = R
        gv = v[n:].reshape(gshape)
        gen = sigmoid.sigmoid_kept(c, gv, G, 0) if gate == "sigmoid" else arith.trunc_kept(c, gv, G, 16)
        return (yield from gather([arith.trunc_kept(c, v[:n].reshape(x.shape), M, 16), gen]))

    def alone(c, R, v):
        t, gt = yield from producers(c, R, v)
        return torch.cat([t.shares.reshape(-1), gt.shares.reshape(-1)])

    def proto(c, R, v):
        t, gt = yield from producers(c, R, v)
        z = yield from arith.kept_mul(c, t, gt, R[2])
        return torch.cat([t.shares.reshape(-1), gt.shares.reshape(-1), z.reshape(-1)])

    inp = torch.cat([x.reshape(-1), g.reshape(-1)])
    out, fig = run2(deal, proto, inp)
    X, G, Z = out[:n].reshape(x.shape), out[n:n + ng].reshape(gshape), out[n + ng:].reshape(x.shape)
    assert torch.equal(Z, X * G)
    assert int((X - (x >> 16)).abs().max()) <= 1
    if gate == "sigmoid":
        assert (fp.decode(G) - torch.sigmoid(fp.decode(g))).abs().max().item() <= 2e-4
    _, fig0 = run2(deal, alone, inp)
    assert (fig["rounds"], fig["bytes_per_party"]) == (fig0["rounds"], fig0["bytes_per_party"])
    assert fig["rounds"] == (4 if gate == "sigmoid" else 1)


@pytest.mark.parametrize("kx, ky, same", [(32, 32, False), (16, 48, False), (16, 16, True)])
def test_product_of_two_truncations_any_shifts_and_order(run2, kx, ky, same):
    """kept_mul with the gate first, shifts adding up to exactly 64 (the m_x m_y term wraps away),
    and x times itself: exactly X * Y, no round beyond the truncations'."""
    s = Stream(new_seed(), "kk")
    x = s.ring((2, 3, 1, 1)) >> (62 - kx - 12)  # |x| < 2^(kx + 12): 12 bits after the truncation
    y = x if same else s.ring((2, 3, 4, 4)) >> (62 - ky - 12)
    nx, ny = x.numel(), y.numel()

    def deal(src):
        Mx = arith.deal_trunc(src.child("x"), nx, kx)
        My = Mx if same else arith.deal_trunc(src.child("y"), ny, ky)
        return Mx, My, arith.deal_kept_mul(src.child("c"), Mx, My, tuple(x.shape), tuple(y.shape))

    def proto(c, R, v):
        Mx, My, Rc = R
        tx = yield from arith.trunc_kept(c, v[:nx].reshape(x.shape), Mx, kx)
        ty = tx if same else (yield from arith.trunc_kept(c, v[nx:].reshape(y.shape), My, ky))
        z = yield from arith.kept_mul(c, tx, ty, Rc)
        return torch.cat([tx.shares.reshape(-1), ty.shares.reshape(-1), z.reshape(-1)])

    inp = x.reshape(-1) if same else torch.cat([x.reshape(-1), y.reshape(-1)])
    out, fig = run2(deal, proto, inp)
    X, Y = out[:nx].reshape(x.shape), out[nx:nx + ny].reshape(y.shape)
    Z = out[nx + ny:].reshape(torch.broadcast_shapes(x.shape, y.shape))
    assert torch.equal(Z, X * Y)
    assert fig["rounds"] == (1 if same else 2)


@pytest.mark.parametrize("n", [2, 3, 8, 64, 700])
def test_max_of_a_truncation_opens_no_difference(run2, fp, n):
    # The maximum of a truncation's result X, exactly as over X, with no 8-byte opening of the first
    # layer's differences (their masks are the truncation's own) and one round fewer.
    x = fp.encode(torch.randn(3, n) * 100) << 16  # at 2f, truncated by f
    x[1] = 5 << 16  # all equal
    rows = 3

    def deal(s):
        M = arith.deal_trunc(s.child("t"), x.numel(), 16)
        return M, pool.deal_reduce_max(s.child("c"), rows, n, L, (M.s.view(rows, n), M.m.view(rows, n), 16))

    def proto(c, R, v):
        M, Rm = R
        t = yield from arith.trunc_kept(c, v, M, 16)
        kept = (t.P.view(rows, n), t.q.view(rows, n).long())
        y = yield from pool.reduce_max(c, t.shares, Rm, kept)
        return torch.cat([t.shares.reshape(-1), y.reshape(-1)])

    out, fig = run2(deal, proto, x)
    X, Y = out[: x.numel()].view(rows, n), out[x.numel():]
    assert int((X - (x >> 16)).min()) >= -1 and int((X - (x >> 16)).max()) <= 1
    assert torch.equal(Y, X.max(-1).values)
    # the first layer opens no differences (so the plan may take it wider); the truncation's round
    # replaces its opening
    ks = pool.reduce_plan(n, rows, kept=True)
    costs, m = [], n
    for i, k in enumerate(ks):
        costs.append(pool.layer_cost(rows, m, k, kept=i == 0))
        m = (m + k - 1) // k
    assert fig["rounds"] == 1 + sum(r for _, r in costs)
    assert fig["bytes_per_party"][0] == 6 * x.numel() + sum(b for b, _ in costs)
    assert costs[0][0] < pool.layer_cost(rows, n, ks[0])[0] - 8 * rows * (ks[0] - 1) // 2


def test_maxpool_of_a_truncation_exact_in_seven_rounds(run2, fp):
    x = fp.encode(torch.randn(1, 3, 11, 10) * 5) << 16
    x[0, 0, :3, :3] = 7 << 16  # ties
    x[0, 1] = 0
    shape = tuple(x.shape)

    def deal(s):
        M = arith.deal_trunc(s.child("t"), x.numel(), 16)
        return M, pool.deal_maxpool(s.child("c"), shape, 3, 2, 1, L, (M.s.view(shape), M.m.view(shape), 16))

    def proto(c, R, v):
        M, Rm = R
        t = yield from arith.trunc_kept(c, v, M, 16)
        y = yield from pool.maxpool2d(c, t.shares, Rm, 3, 2, 1, (t.P.view(shape), t.q.view(shape).long()))
        return torch.cat([t.shares.reshape(-1), y.reshape(-1)])

    out, fig = run2(deal, proto, x)
    X, Y = out[: x.numel()].view(shape), out[x.numel():]
    assert torch.equal(Y, F.max_pool2d(X.double(), 3, 2, 1).long().reshape(-1))
    assert fig["rounds"] == 1 + 7


def _recording(gen, log):
    """Run a protocol generator, appending (what this party sent, what it received) for each round."""
    out = next(gen)
    while True:
        peer = yield out
        log.append(([t.clone() for t in out], [t.clone() for t in peer]))
        try:
            out = gen.send(peer)
        except StopIteration as stop:
            return stop.value


@pytest.mark.parametrize("scale", [0, 40])
def test_a_server_sees_only_uniform_values_when_a_layer_reuses_a_truncation(run2, scale):
    # What server_b opens while a layer reuses a truncation: the bits above the shift of y + r, then
    # q m - a2 mod 2^16. For an all-zero input (scale 0) and for large values alike, each looks
    # uniform: every sixteenth of its range holds 1/16 of the elements (within 1.5% of n).
    n, k = 64_000, 16
    x = torch.zeros(1, 1, 1, n, dtype=torch.int64) if scale == 0 else (Stream(new_seed(), "v").ring((1, 1, 1, n)) >> 23)
    W = Stream(new_seed(), "w").ring((2, 1, 1, 1))
    B = Stream(new_seed(), "b").ring((2, 1, 1, 1))
    op = lambda a, w: F.conv2d(a, w)  # noqa: E731
    log: list = []

    def cdeal(src, M):
        return arith.deal_trunc_linear(src, M, tuple(x.shape), (1, 2, 1, n), op, B if src.is_dealer else None)

    def crun(c, t, R):
        R = arith.prepare_trunc_linear(R, op, W - B)
        wb = W - B + B if c.party == 0 else torch.zeros_like(B)
        return (yield from arith.trunc_linear(c, t, R, lambda e: op(e, wb), lambda e: op(e, wb)))

    deal, proto = _trunc_then(cdeal, crun, x, k)

    def watched(c, R, v):
        gen = proto(c, R, v)
        return (yield from (_recording(gen, log) if c.party == 1 else gen))

    run2(deal, watched, x)
    (mine1, peer1), (mine2, peer2) = log
    c_high = (arith.from_high_bytes(mine1, n) + arith.from_high_bytes(peer1, n)) & ((1 << 48) - 1)
    e2 = (mine2[0].long() + peer2[0].long()) & 0xFFFF
    for opened, bits in ((c_high, 48), (e2.reshape(-1), 16)):
        counts = torch.bincount((opened >> (bits - 4)).reshape(-1), minlength=16).double()
        assert ((counts / n - 1 / 16).abs() <= 0.015).all(), counts


@pytest.mark.parametrize("k", [16, 20, 24, 30, 31, 32, 40, 58, 63])
def test_the_bits_above_a_shift_travel_whole_and_packed(k):
    # high_bytes relies on integer casts keeping the low bits (two's complement), and the bits past
    # the last whole byte travel as bit planes: pin both for every width, over a length that is not a
    # multiple of 64
    n = 10_001
    v = Stream(new_seed(), "hb").ring((n,))
    v[:4] = torch.tensor([0, -1, 2**63 - 1, -(2**63)])
    pieces = arith.high_bytes(v, k)
    sent = sum(p.numel() * p.element_size() for p in pieces)
    assert sent == arith.open_nbytes(k, n) == (64 - k) // 8 * n + (64 - k) % 8 * 8 * 157  # 157 words of 64
    assert torch.equal(arith.from_high_bytes(pieces, n), lshr(v, k))
    # 30 bits (a chained layer's fused truncation): 34 bits in 4.25 bytes, not 5
    # (short tensors, where 64-element planes would be longer, send a whole byte instead)
    assert arith.open_nbytes(30, 1024) == 4 * 1024 + 2 * 8 * 16 and arith.open_nbytes(16, 1024) == 6 * 1024
    assert arith.open_nbytes(30, 16) == 5 * 16 and arith.open_nbytes(30, 17) == 4 * 17 + 2 * 8
    short = Stream(new_seed(), "hs").ring((16,))
    assert [p.dtype for p in arith.high_bytes(short, 30)] == [torch.int32, torch.uint8]
    assert torch.equal(arith.from_high_bytes(arith.high_bytes(short, 30), 16), lshr(short, 30))


@pytest.mark.parametrize("shift", [0, 16])
def test_a_matrix_layer_takes_a_relus_masked_form_with_no_opening(run2, shift):
    """relu_form then form_linear: W relu(x) exactly in the ring (the products wrap mod 2^64), in
    the ReLU's 3 rounds and bytes alone: the layer opens nothing (a linear layer would open its
    input, 8 bytes per element, in a fourth round). With a fused truncation (shift 16) the q m terms
    are dealt mod 2^16 and still give the exact result."""
    s = Stream(new_seed(), "w")
    rows, ins, outs = 3, 45, 20
    x = _rand_ring(rows * ins, 30).view(rows, ins)
    x[0, :4] = torch.tensor([0, 1, -1, -(2**29)])
    W, B, B0 = s.ring((outs, ins)), s.ring((outs, ins)), s.ring((outs, ins))
    Fw = W - B

    def deal(src):
        R = compare.deal_relu(src, rows * ins, shift, L)
        terms = compare.inject_terms(R)
        return R, arith.deal_form_linear(src, terms, B if src.is_dealer else None, rows, outs, ins)

    def proto(c, R, v):
        Rr, Rl = R
        Rr.form = True
        Rl = arith.prepare_form_linear(Rl, Fw)
        wbT = (Fw + B0 if c.party == 0 else B - B0).t()
        y = yield from compare.relu_form(c, v, Rr, shift)
        z = yield from arith.form_linear(y, Rl, lambda e: e @ wbT, (rows, ins))
        return torch.cat([y.shares.reshape(-1), z.reshape(-1)])

    out, fig = run2(deal, proto, x)
    y, z = out[: rows * ins].view(rows, ins), out[rows * ins:].view(rows, outs)
    ref = torch.where(x >= 0, x >> shift, 0)
    assert int((y - ref).abs().max()) <= 1  # the fused truncation: within one unit
    assert torch.equal(z, y @ W.t())  # exact in the ring, given the ReLU's result
    _, relu_fig = run2(lambda src: compare.deal_relu(src, rows * ins, shift, L),
                       lambda c, R, v: compare.relu(c, v, R, shift), x)
    assert fig["rounds"] == relu_fig["rounds"] == 3
    assert fig["bytes_per_party"] == relu_fig["bytes_per_party"]
