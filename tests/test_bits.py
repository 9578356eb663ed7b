import torch

from secdfd.common.engine.bits import Form, Products, pack, planes, unpack
from secdfd.common.engine.prng import Stream, new_seed
from secdfd.common.engine.protocols import compare, pool


def test_planes_match_bit_extraction():
    x = Stream(new_seed(), "p").ring((1000,))
    for lo, count in ((0, 41), (16, 41), (5, 12)):
        p = planes(x, lo, count)
        assert p.shape == (count, 16)
        for j in range(count):
            want = (x >> (lo + j)) & 1
            got = unpack(p[j], 1000)
            assert torch.equal(got, want)


def test_pack_unpack_roundtrip():
    b = torch.tensor([1, 0, 1, 1] * 50)
    assert torch.equal(unpack(pack(b), 200), b)


def test_products_of_masked_bits_are_exact():
    # v_i = alpha_i XOR (beta_i AND a_i); check every product against the plain AND.
    n = 3
    s = Stream(new_seed(), "b")
    a = s.ring((n, 4))
    alpha = s.ring((n, 4))
    beta = s.ring((n, 4))
    spec = Products(n, ((0, 1), (0, 1, 2), (2, 1)))
    mono = spec.deal(a)
    a0 = s.ring((n, 4))
    a1 = a ^ a0
    m0 = s.ring(tuple(mono.shape))
    m1 = mono ^ m0
    forms = [[Form(alpha[v], beta[v]) for v in p] for p in spec.products]
    r0 = spec.evaluate(forms, a0, m0, 0)
    r1 = spec.evaluate(forms, a1, m1, 1)
    v = alpha ^ (beta & a)
    for k, p in enumerate(spec.products):
        want = v[p[0]]
        for j in p[1:]:
            want = want & v[j]
        assert torch.equal(r0[k] ^ r1[k], want)


def test_dealt_monomials_are_the_ands_of_their_variables():
    # the dealer builds them one size at a time (a_T = a_(T[:-1]) AND a_last); check each against
    # the plain AND, for a max-of-12 selector (22,396 monomials), a comparison leaf and a tree root
    root = compare.tree_levels(32)[1][-1][0].spec
    mixed = Products(5, ((4, 0, 2), (1, 3), (0, 1, 2, 3)))
    specs = (pool._selector_products(12), compare._leaf_products(6), root, mixed)
    for spec in specs:
        a = Stream(new_seed(), "m").ring((spec.nvars, 2, 3))
        mono = spec.deal(a)
        assert mono.shape == (len(spec.monomials), 2, 3)
        for i, t in enumerate(spec.monomials):
            want = a[t[0]]
            for v in t[1:]:
                want = want & a[v]
            assert torch.equal(mono[i], want), t


def test_products_of_one_length_over_opened_bits_are_exact_all_at_once(monkeypatch):
    # a max's selectors: products of one length whose variables are v = alpha XOR a (a bit opened
    # under the dealer's mask) take the stacked path; check it against the plain AND, and against
    # the general path (forms with a beta, which that path takes), share for share
    stacked = []
    real = Products._evaluate_stacked
    monkeypatch.setattr(Products, "_evaluate_stacked", lambda self, *a: stacked.append(1) or real(self, *a))
    s = Stream(new_seed(), "s")
    for spec in (pool._selector_products(3), pool._selector_products(5), pool._selector_products(12)):
        a = s.ring((spec.nvars, 3))
        alpha = s.ring((spec.nvars, 3))
        mono = spec.deal(a)
        a0 = s.ring(tuple(a.shape))
        m0 = s.ring(tuple(mono.shape))
        v = alpha ^ a
        shares = []
        for beta in (None, torch.full_like(alpha, -1)):  # beta = all ones: the same forms, the general path
            forms = [[Form(alpha[u], None if beta is None else beta[u]) for u in p] for p in spec.products]
            r0 = spec.evaluate(forms, a0, m0, 0)
            r1 = spec.evaluate(forms, a ^ a0, mono ^ m0, 1)
            shares.append(r0)
            for k, p in enumerate(spec.products):
                want = v[p[0]]
                for u in p[1:]:
                    want = want & v[u]
                assert torch.equal(r0[k] ^ r1[k], want)
        assert all(torch.equal(x, y) for x, y in zip(*shares, strict=True))
    assert len(stacked) == 6  # both parties of three specs, with beta None only
