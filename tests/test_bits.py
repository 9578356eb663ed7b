import pytest
import torch

from secdfd.common.engine.bits import Form, Products, pack, planes, unpack
from secdfd.common.engine.prng import Stream, new_seed
from secdfd.common.engine.protocols import compare, pool
from secdfd.common.engine.protocols.arith import Masked
from secdfd.common.engine.protocols.base import Ctx


def test_planes_match_bit_extraction():
    x = Stream(new_seed(), "p").ring((1000,))
    for lo, count in ((0, 41), (16, 41), (5, 12)):
        p = planes(x, lo, count)
        assert p.shape == (count, 16)
        for j in range(count):
            want = (x >> (lo + j)) & 1
            got = unpack(p[j], 1000)
            assert torch.equal(got, want)
        assert torch.equal(p[:, -1] >> (1000 % 64), torch.zeros(count, dtype=torch.int64))  # zero padding
    wide = Stream(new_seed(), "w").ring((2000,))
    assert torch.equal(planes(wide[::2], 3, 33), planes(wide[::2].clone(), 3, 33))  # a strided view


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
        # the same shares from the table each server lays out when it prepares the bundle
        forms = [[Form(alpha[u], None) for u in p] for p in spec.products]
        t0, t1 = spec.stacked_table(a0, m0, 0), spec.stacked_table(a ^ a0, mono ^ m0, 1)
        assert tuple(t0.shape) == (len(spec.products), 1 << len(spec.products[0]), 3)
        p0, p1 = spec.evaluate_stacked(forms, t0), spec.evaluate_stacked(forms, t1)
        assert all(torch.equal(x, y) for x, y in zip(p0, shares[0], strict=True))
        for k, p in enumerate(spec.products):
            want = v[p[0]]
            for u in p[1:]:
                want = want & v[u]
            assert torch.equal(p0[k] ^ p1[k], want)
        with pytest.raises(ValueError):
            spec.evaluate_stacked(forms, t0[:, :-1])
        with pytest.raises(ValueError):  # forms with a beta are not opened bits
            spec.evaluate_stacked([[Form(alpha[u], alpha[u]) for u in p] for p in spec.products], t0)
    assert len(stacked) == 6  # both parties of three specs, with beta None only


def _max_layer(seeds, corrections, n, x0, x1, prepared):
    """One max-of-n layer over (100, n) shares, both parties, from the bundle of `seeds`."""
    from secdfd.common.engine.channel import pair, run_pair
    from secdfd.common.engine.driver import drive
    from secdfd.common.engine.randomness import Source

    R = [pool.deal_max(Source.party(0, seeds[0], "m"), 100, n, 32),
         pool.deal_max(Source.party(1, seeds[1], "m", corrections), 100, n, 32)]
    if prepared:
        R = [pool.prepare_max(r, p) for p, r in enumerate(R)]
        assert all(r.sel_mono is None and r.sel_table is not None for r in R)
    c0, c1 = pair()
    y = run_pair(lambda: drive(c0, pool.max_lastaxis(Ctx(0, 16, 32), x0, R[0]), "m"),
                 lambda: drive(c1, pool.max_lastaxis(Ctx(1, 16, 32), x1, R[1]), "m"))
    return y, R


def test_a_prepared_max_layer_matches_the_unprepared_one_and_consumes_its_table():
    """A max-of-k layer's selectors from the prepared table: the same shares as from the dealt
    monomials, and the table is gone after its one use."""
    from secdfd.common.engine.randomness import Source
    from secdfd.common.engine.sharing import share
    from secdfd.common.errors import RandomnessError

    for n in (3, 5, 12):
        seeds = (new_seed(), new_seed())
        dealer = Source.dealer(seeds, "m")
        pool.deal_max(dealer, 100, n, 32)
        x = Stream(new_seed(), "x").ring((100, n)) >> 34  # |x| < 2^30
        x0, x1 = share(x)
        (y0, y1), _ = _max_layer(seeds, dealer.corrections, n, x0, x1, False)
        (z0, z1), R = _max_layer(seeds, dealer.corrections, n, x0, x1, True)
        assert torch.equal(y0, z0) and torch.equal(y1, z1)
        assert torch.equal(z0 + z1, x.max(-1).values)
        assert all(r.sel_table is None for r in R)  # used once
        with pytest.raises(RandomnessError, match="already used"):  # and refused a second time
            list(pool._selectors(Ctx(0, 16, 32), torch.zeros((len(pool._pairs(n)), 2), dtype=torch.int64), n, R[0]))


def _leaf_by_products(party, nu, a, mono):
    """A leaf group's (g, e) shares by the generic product evaluation (`Products.evaluate`)."""
    size = nu.shape[0]
    spec = compare._leaf_products(size)
    e_forms = [Form(nu[k], None) for k in range(size)]
    g_forms = [Form(None, nu[k]) for k in range(size)]
    forms = [[e_forms[v] for v in p[:-1]] + [g_forms[p[-1]]] for p in spec.products[:-1]]
    forms.append([e_forms[v] for v in spec.products[-1]])
    prods = spec.evaluate(forms, a, mono, party)
    g = a[size - 1] & nu[size - 1]
    for p in prods[: size - 1]:
        g = g ^ p
    return g, prods[size - 1]


def test_leaf_groups_by_the_fold_are_exact():
    """A leaf group's fold gives each party the very shares the generic product evaluation
    gives, and they open to e = AND of e_k and g = the group's borrow, for every group size used."""
    s = Stream(new_seed(), "leaf")
    for size in range(1, 8):
        count, W = 3, 5
        nu = s.ring((count, size, W)).transpose(0, 1)  # laid out as `_group_bits` gives them: views
        bits = s.ring((count, size, W)).transpose(0, 1)  # the dealer's mask bits s_k
        spec = compare._leaf_products(size)
        mono = spec.deal(bits) if spec.monomials else torch.empty((0, count, W), dtype=torch.int64)
        a0, m0 = s.ring(bits.shape), s.ring(mono.shape)
        a1, m1 = bits ^ a0, mono ^ m0
        order = compare._leaf_table(size).order  # the dealer deals the leaf's monomials in table order
        out = [compare._leaf_group(p, nu, a, m[order]) for p, a, m in ((0, a0, m0), (1, a1, m1))]
        ref = [_leaf_by_products(p, nu, a, m) for p, a, m in ((0, a0, m0), (1, a1, m1))]
        for (g, e), (gr, er) in zip(out, ref, strict=True):
            assert torch.equal(g, gr) and torch.equal(e, er)
        e_k = nu ^ bits
        g_k = nu & bits
        hi = size - 1
        e_want = e_k[0].clone()
        for k in range(1, size):
            e_want &= e_k[k]
        g_want, run = g_k[hi].clone(), e_k[hi].clone()
        for k in range(hi - 1, -1, -1):
            g_want ^= run & g_k[k]
            run &= e_k[k]
        assert torch.equal(out[0][0] ^ out[1][0], g_want)
        assert torch.equal(out[0][1] ^ out[1][1], e_want)


def _node_by_products(party, batch, d, a, mono):
    """A node batch's (XOR of its products below the top's g, its e) by `Products.evaluate`."""
    spec, k = batch.spec, batch.arity
    forms = [[Form(d[v], None) for v in p] for p in spec.products]
    prods = spec.evaluate(forms, a, mono, party)
    below = torch.zeros_like(a[0])
    for p in prods[: k - 1]:
        below ^= p
    return below, prods[k - 1] if batch.need_e else None


def test_tree_nodes_by_the_chain_fold_are_exact():
    """A tree node's chain fold gives each party the very shares the generic product evaluation
    gives, and they open to the node's borrow and equality over its children, for every arity a
    tree uses (1 to 8), with and without the node's e (a node of one child, in a deep tree's last
    level, always passes its e on)."""
    s = Stream(new_seed(), "node")
    for arity in range(1, compare.ROOT_FANIN + 1):
        for need_e in (False, True) if arity > 1 else (True,):
            nodes, W = 3, 5
            batch = compare.Batch(tuple((0,) * arity for _ in range(nodes)), arity, need_e)
            spec = batch.spec
            v = s.ring((spec.nvars, nodes, W))  # the children's e (index k) and g (arity + k)
            bits = s.ring(v.shape)  # the dealer's masks a
            mono = spec.deal(bits)
            a0, m0 = s.ring(bits.shape), s.ring(mono.shape)
            shares = ((0, a0, m0), (1, bits ^ a0, mono ^ m0))
            d = {u: v[u] ^ bits[u] for u in compare._used(spec)}  # the opened d = v XOR a
            table = compare._node_table(arity, need_e)  # the dealer deals in table order
            out = [compare._node(p, batch, d, a, m[table.order]) for p, a, m in shares]
            ref = [_node_by_products(p, batch, d, a, m) for p, a, m in shares]
            for (g, e), (gr, er) in zip(out, ref, strict=True):
                assert torch.equal(g, gr)
                assert (e is None and er is None) if not need_e else torch.equal(e, er)
            e_k, g_k = v[:arity], v[arity:]
            g_want, run = torch.zeros_like(v[0]), e_k[arity - 1].clone()
            for low in range(arity - 2, -1, -1):  # e_hi .. e_(low+1) g_low
                g_want ^= run & g_k[low]
                run &= e_k[low]
            assert torch.equal(out[0][0] ^ out[1][0], g_want)
            if need_e:
                assert torch.equal(out[0][1] ^ out[1][1], run)


def test_injection_selects_b_times_x_exactly():
    """`injected` (one select between the outcomes of d = 0 and d = 1) gives shares of b * x from the
    opened d = b XOR beta, with and without a truncation's Q m term, exactly in the ring."""
    s = Stream(new_seed(), "inject")
    n = 1000
    for with_q in (False, True):
        P, sv, mv = s.ring((n,)), s.ring((n,)), s.ring((n,))
        Q = (s.ring((n,)) & 1) << 48 if with_q else None
        beta, b = s.ring((n,)) & 1, s.ring((n,)) & 1
        d = b ^ beta  # what the parties open

        def split(v):
            r = s.ring(v.shape)
            return r, v - r

        dealt = [split(v) for v in (sv, mv, beta, beta * sv, beta * mv)]
        out = []
        for party in (0, 1):
            s_i, m_i, beta_i, beta_s_i, beta_m_i = (v[party] for v in dealt)
            m = Masked(P, s_i, None, Q, m_i if with_q else None)
            R = compare.InjectRand(torch.zeros(1, dtype=torch.int64), beta_i, beta_s_i, beta_m_i if with_q else None)
            out.append(compare.injected(Ctx(party, 16, 32), d, m, R))
        x = P - sv + (Q * mv if with_q else 0)
        assert torch.equal(out[0] + out[1], b * x)
