"""Comparison, SecReLU and bit injection on masked values.

Sign of x from its masked form x = P - s (+ Q*m), with |x| < 2^L (L = ctx.cmp_bits):
y = x + 2^L lies in [0, 2^(L+1)), and y mod 2^(L+1) = (u - s) mod 2^(L+1) with u = P + 2^L public
(the Q*m term is a multiple of 2^(64-k), which vanishes mod 2^(L+1) when L + 1 <= 64 - k). So
    [x >= 0] = bit_L(y) = u_L XOR s_L XOR [u mod 2^L < s mod 2^L].
The borrow [u_low < s_low] compares public bits with the dealer's secret bits of s. It is a tree
over the bits, from low to high: a node's (g, e) = (s > u, s == u) on its range;
    g = g_hi XOR e_hi g_(hi-1) XOR e_hi e_(hi-1) g_(hi-2) ...,   e = prod e_i.
- Leaves: groups of 4 to 7 bits. g_i = s_i AND NOT u_i and e_i = s_i XOR NOT u_i are affine in the
  dealer's bits with public coefficients, so with shares of every product of the group's bits
  (2^size - size - 1 dealer bits per group: 11 for 4 bits, 26 for 5, 57 for 6) a group's (g, e) is
  local: no round. A party evaluates it by folding its table of those shares along one bit at a
  time (`_leaf_group`).
- Inner nodes, one round each: open d = v XOR a for each child bit used in a product, then every
  product of the opened bits is local given the dealer's shares of the mask products (a root of a
  children opens 2(a - 1) bits and needs 3 * 2^(a-1) - 2a - 1 dealt monomials: 83 for 6, 177 for 7),
  evaluated by the same kind of fold along its children (`_node`).
Up to 56 bits the tree is ONE round: the leaves are as wide as it takes for one root of at most 8
children, split where the dealer's bits are fewest (`leaf_groups`): L = 32 is 6 groups (6, 6, 5, 5,
5, 5), 10 bits opened and 301 dealt per comparison; L = 40 is 7 groups, 12 bits opened and 514
dealt. Fan-in-4 nodes over 4-bit groups took two rounds for both, opening 16 and 21 bits with 133
and 161 dealt: the dealer's bits buy a round and save online bits. Beyond 56 bits: 4-bit groups
under fan-in-4 levels.

Bit injection (ReLU and selection): b * x for a shared bit b and x = P - s + Q*m. Open d = b XOR beta
for a dealer bit beta (one round, one bit per element); then b = d + (1 - 2d) beta and
b*x = d*P + (1-2d)*P*[beta] - d*[s] - (1-2d)*[beta s] + Q*(d*[m] + (1-2d)*[beta m]).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from secdfd.common.engine.bits import ONES, Products, planes, unpack, words_for
from secdfd.common.engine.protocols.arith import AffineForm, Masked, MaskRand, deal_mask, mask_open
from secdfd.common.engine.protocols.base import Ctx, Proto
from secdfd.common.engine.randomness import Source

# ---------------------------------------------------------------------------------------------
# The tree's shape: which children each node combines, and the products each batch needs.

FANIN = 4  # children per inner node of a deep tree (over more than ONE_ROUND_BITS bits)
ROOT_FANIN = 8  # a one-round tree: up to 8 leaf groups under one root, a product of up to 8 opened bits
LEAF_MAX = 7  # leaf groups of up to 7 bits (120 dealt monomials each)
ONE_ROUND_BITS = ROOT_FANIN * LEAF_MAX
ONE_ROUND_MAX = 1 << 20  # comparisons per batch that take the one-round tree (see `one_round`)


def one_round(nbits: int, n: int) -> bool:
    """Whether a batch of n comparisons over nbits takes the one-round tree. It costs the dealer more
    bits per comparison (301 instead of 133 for 32 bits, 514 instead of 161 for 40) and opens fewer
    (10 instead of 16, 12 instead of 21): 21 dealt bytes buy 0.75 bytes online and a round. Every
    batch of DFDNet at 128 px takes it (the largest, a first block's max-pool, has 726,144
    comparisons); the bound keeps much larger inputs from making the dealer's bundles grow by 21 bytes
    per comparison without limit. Full DFDNet at 128 px, 32 bits, in one process, against a bound of
    2^16: 212.26 -> 202.53 MB online and 723 -> 690 rounds, for 975 -> 1,278 MB dealt."""
    return nbits <= ONE_ROUND_BITS and n <= ONE_ROUND_MAX


@dataclass(frozen=True)
class Batch:
    """Nodes of one level with the same arity, evaluated together."""

    nodes: tuple[tuple[int, ...], ...]  # child indices of each node, low to high
    arity: int
    need_e: bool

    @property
    def spec(self) -> Products:
        return _node_products(self.arity, self.need_e)


@cache
def _node_products(arity: int, need_e: bool) -> Products:
    """Variables: e_k at index k, g_k at index arity + k (k = 0 is the lowest child)."""
    hi = arity - 1
    prods = []
    for low in range(hi - 1, -1, -1):  # e_hi ... e_(low+1) g_low
        prods.append(tuple(range(hi, low, -1)) + (arity + low,))
    if need_e:
        prods.append(tuple(range(hi, -1, -1)))
    return Products(2 * arity, tuple(prods))


def _split(nbits: int, groups: int) -> tuple[int, ...]:
    """nbits in `groups` leaf groups as even as possible, the larger ones low."""
    q, r = divmod(nbits, groups)
    return tuple(q + (i < r) for i in range(groups))


@cache
def leaf_groups(nbits: int, one: bool = True) -> tuple[int, ...]:
    """Leaf group sizes, low to high. One round (`one`, up to ONE_ROUND_BITS bits): the split into 2
    to 8 groups under one root that the dealer pays least for (its leaves' and the root's
    monomials); otherwise groups of 4 under fan-in-4 levels. Up to 4 bits: one group, no round."""
    if nbits <= 4:
        return (nbits,)
    if not one or nbits > ONE_ROUND_BITS:
        return _split(nbits, -(-nbits // 4))
    best = min(
        (sum(len(_leaf_products(g).monomials) for g in _split(nbits, a)) + len(_node_products(a, False).monomials), a)
        for a in range(max(2, -(-nbits // LEAF_MAX)), min(nbits, ROOT_FANIN) + 1)
    )
    return _split(nbits, best[1])


@cache
def tree_levels(nbits: int, one: bool = True) -> tuple[tuple[int, ...], tuple[tuple[Batch, ...], ...]]:
    """Leaf group sizes (low to high) and the inner levels of the comparison tree over nbits: one
    root over every group (`one`, up to ONE_ROUND_BITS), or fan-in-4 levels."""
    groups = leaf_groups(nbits, one)
    fanin = ROOT_FANIN if one and nbits <= ONE_ROUND_BITS else FANIN
    levels = []
    width = len(groups)
    while width > 1:
        nodes = [tuple(range(i, min(i + fanin, width))) for i in range(0, width, fanin)]
        root = len(nodes) == 1
        by_arity: dict[int, list[tuple[int, ...]]] = {}
        for nd in nodes:
            by_arity.setdefault(len(nd), []).append(nd)
        levels.append(tuple(Batch(tuple(v), k, not root) for k, v in sorted(by_arity.items())))
        width = len(nodes)
    return groups, tuple(levels)


@cache
def _leaf_products(size: int) -> Products:
    """Variables are the group's bits k; product j (j < size-1) is e_hi .. e_(low+1) g_low with
    low = size-2-j, the last is e_hi .. e_0 (`_leaf_group` evaluates them, e or g by position)."""
    hi = size - 1
    prods = [tuple(range(hi, low - 1, -1)) for low in range(hi - 1, -1, -1)]
    prods.append(tuple(range(hi, -1, -1)))
    return Products(size, tuple(prods))


@cache
def _used(spec: Products) -> list[int]:
    """Variables that appear in a product: only these are opened (the top g is used linearly)."""
    return sorted({v for p in spec.products for v in p})


def tree_rounds(nbits: int, n: int = 1) -> int:
    """Rounds of a batch of n comparisons' tree over nbits: none up to 4 bits; 1 up to 56 bits
    (`one_round`), else 2 up to 64."""
    return len(tree_levels(nbits, one_round(nbits, n))[1])


def tree_dealt_bits(nbits: int, n: int = 1) -> int:
    """Bits the dealer sends per comparison over nbits for its tree (the products of each leaf group's
    mask bits and of each node's opened bits; the masks themselves come from seeds): 301 for 32 bits,
    514 for 40 in one round; 133 and 161 in two."""
    groups, levels = tree_levels(nbits, one_round(nbits, n))
    leaves = sum(len(_leaf_products(size).monomials) for size in groups)
    return leaves + sum(len(b.spec.monomials) * len(b.nodes) for level in levels for b in level)


def tree_bits(nbits: int, n: int = 1) -> int:
    """Bits one comparison (of a batch of n) over nbits opens in its tree (the leaves are local): 10
    for 32 bits, 12 for 40 in one round; 16 and 21 in two."""
    levels = tree_levels(nbits, one_round(nbits, n))[1]
    return sum(len(_used(b.spec)) * len(b.nodes) for level in levels for b in level)


# ---------------------------------------------------------------------------------------------
# Randomness.


@dataclass
class CmpRand:
    leaf_mono: list[torch.Tensor]  # per leaf batch: shares of products of the group's s bits (`_leaf_table` order)
    levels: list[list[tuple[torch.Tensor, torch.Tensor]]]  # per level, per batch: (a, monomials in `_node_table` order)
    one: bool  # the tree's shape (`one_round` of the batch's size): both sides derive it from n


def _leaf_layout(nbits: int, one: bool) -> list[tuple[int, int, int]]:
    """(first bit, group size, number of groups) runs of equal-size leaf groups."""
    groups = leaf_groups(nbits, one)
    runs: list[tuple[int, int, int]] = []
    bit = 0
    for size in groups:
        if runs and runs[-1][1] == size:
            runs[-1] = (runs[-1][0], size, runs[-1][2] + 1)
        else:
            runs.append((bit, size, 1))
        bit += size
    return runs


def _group_bits(sbits: torch.Tensor, first: int, size: int, count: int) -> torch.Tensor:
    """Planes (nbits, W) -> (size, count, W): bit k of group j at [k, j]."""
    x = sbits[first : first + size * count]
    return x.reshape(count, size, -1).transpose(0, 1)


def deal_compare(src: Source, sbits: torch.Tensor, n: int, nbits: int) -> CmpRand:
    """Randomness for comparing n public values with the dealer's s (its bit planes `sbits`)."""
    W = words_for(n)
    one = one_round(nbits, n)
    leaf_mono = []
    for i, (first, size, count) in enumerate(_leaf_layout(nbits, one)):
        spec = _leaf_products(size)
        shape = (len(spec.monomials), count, W)

        def leaf_value(first: int = first, size: int = size, count: int = count) -> torch.Tensor:
            return _leaf_table(size).deal(_group_bits(sbits, first, size, count))

        leaf_mono.append(src.bits_from(f"leaf{i}", shape, leaf_value))
    levels = []
    for li, level in enumerate(tree_levels(nbits, one)[1]):
        batches = []
        for bi, batch in enumerate(level):
            spec = batch.spec
            a = src.bits(f"a{li}.{bi}", (spec.nvars, len(batch.nodes), W))
            shape = (len(spec.monomials), len(batch.nodes), W)
            mono = src.bits_from(f"m{li}.{bi}", shape, _dealer_monomials(_node_table(batch.arity, batch.need_e), a))
            batches.append((a, mono))
        levels.append(batches)
    return CmpRand(leaf_mono, levels, one)


def _dealer_monomials(table: Table, a: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: table.deal(a)


@dataclass(frozen=True)
class Table:
    """Where a party's shares sit in the table that a leaf group or a node folds (`_leaf_group`,
    `_node`): one row per subset T of variables that some product needs, the constant 1 for the empty T, a_v for
    T = {v}, the dealt share of a_T otherwise. The table's upper half is its top variable times each
    subset of the lower half. The dealer deals the monomials in table order, so that they lie in runs
    of consecutive rows, and the upper half's in one run."""

    spec: Products
    rows: int
    singles: tuple[tuple[int, int], ...]  # (row, variable)
    runs: tuple[tuple[int, int, int], ...]  # (first row, first dealt row, rows)
    order: torch.Tensor  # the dealer's order: each dealt row's index in `spec.monomials`
    top: tuple[int, int]  # the top variable and the dealt row of its first product (row rows/2 + 1)

    @staticmethod
    def of(spec: Products, subsets: list[tuple[int, ...]]) -> Table:
        """The table whose row r is the subset subsets[r] (subsets[0] the empty one)."""
        singles: list[tuple[int, int]] = []
        runs: list[tuple[int, int, int]] = []
        order: list[int] = []
        for r, t in enumerate(subsets):
            if len(t) == 1:
                singles.append((r, t[0]))
            elif t:
                if runs and runs[-1][0] + runs[-1][2] == r:
                    runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
                else:
                    runs.append((r, len(order), 1))
                order.append(spec.index[tuple(sorted(t))])
        # every row is written once: the constant, the variables used, every dealt monomial
        if (
            subsets[0] != ()
            or sorted(order) != list(range(len(spec.monomials)))
            or sorted(v for _, v in singles) != _used(spec)
            or len(subsets) != 1 + len(singles) + len(order)
        ):
            raise AssertionError(f"a table of {len(subsets)} rows does not match its products")
        half = len(subsets) // 2
        top = subsets[half]
        upper = [(r, v) for r, v in singles if r >= half], [run for run in runs if run[0] + run[2] > half]
        times_top = [sorted((*top, *t)) for t in subsets[:half]]
        if len(subsets) % 2 or len(top) != 1 or [sorted(t) for t in subsets[half:]] != times_top:
            raise AssertionError(f"a table of {len(subsets)} rows is not its top variable times its lower half")
        if upper != ([(half, top[0])], [(half + 1, runs[-1][1], half - 1)] if half > 1 else []):
            raise AssertionError(f"a table of {len(subsets)} rows does not hold its upper half in one run")
        first = runs[-1][1] if half > 1 else 0
        return Table(spec, len(subsets), tuple(singles), tuple(runs), torch.tensor(order, dtype=torch.int64),
                     (top[0], first))

    def deal(self, a: torch.Tensor) -> torch.Tensor:
        """Dealer: the monomials of the mask bits a, in table order."""
        return self.spec.deal(a)[self.order.to(a.device)]

    def fold_top(self, party: int, a: torch.Tensor, mono: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """This party's table folded along its top variable v with the public planes x:
            t'[U] = x AND t[U] XOR t[U + v]    for the U of the lower half,
        made from its shares of the variables a and of the dealt monomials, without the whole table
        (one pass fewer over it, and no copy)."""
        half = self.rows // 2
        v, first = self.top
        upper = mono[first : first + half - 1]  # t[U + v] for U = 1 .. half - 1
        out = torch.empty((half, *a.shape[1:]), dtype=torch.int64, device=a.device)
        if party == 0:  # the constant 1
            torch.bitwise_xor(x, a[v], out=out[0])
        else:
            out[0] = a[v]
        for r, w in self.singles:
            if r < half:
                torch.bitwise_and(a[w], x, out=out[r])
                out[r] ^= upper[r - 1]
        for r, i, k in self.runs:
            if r < half:
                torch.bitwise_and(mono[i : i + k], x, out=out[r : r + k])
                out[r : r + k] ^= upper[r - 1 : r - 1 + k]
        return out


# ---------------------------------------------------------------------------------------------
# Online.


def _not(x: torch.Tensor) -> torch.Tensor:
    return x ^ ONES


def _leaf(ctx: Ctx, u: torch.Tensor, sbits: torch.Tensor, R: CmpRand, nbits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local (g, e) shares of every leaf group: (ngroups, W) each."""
    gs, es = [], []
    for i, (first, size, count) in enumerate(_leaf_layout(nbits, R.one)):
        nu = _not(_group_bits(u, first, size, count))  # public NOT u_k, (size, count, W)
        sb = _group_bits(sbits, first, size, count)
        g, e = _leaf_group(ctx.party, nu, sb, R.leaf_mono[i])
        gs.append(g)
        es.append(e)
    return torch.cat(gs, 0), torch.cat(es, 0)


@cache
def _leaf_table(size: int) -> Table:
    """A leaf group's table (`_leaf_group`): row M holds the subset of the group's bits k with bit k of M
    set."""
    return Table.of(_leaf_products(size), [tuple(k for k in range(size) if m >> k & 1) for m in range(1 << size)])


def _leaf_group(party: int, nu: torch.Tensor, a: torch.Tensor, mono: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, e) shares of leaf groups of one size: nu (size, count, W) the public NOT u_k, a and mono this
    party's shares of the mask bits s_k and of their dealt monomials (in `_leaf_table` order).

    With e_k = nu_k XOR s_k and g_k = nu_k AND s_k, the group's bits from k down give
        E_k = e_k E_(k-1) = nu_k E_(k-1) XOR s_k E_(k-1),
        G_k = g_k XOR e_k G_(k-1) = nu_k s_k XOR nu_k G_(k-1) XOR s_k G_(k-1),
    with E and G over no bit 1 and 0, and e = E_hi, g = G_hi. Both are polynomials in the s bits with
    public coefficients; a party's share of one is the same linear map applied to its shares s_T of
    every product of s bits. Held in one table T indexed by bit mask (T[0] the constant 1), the map is
    a fold along each bit from the highest: E_k and G_k over T equal E_(k-1) and G_(k-1) over
        T'[U] = nu_k AND T[U] XOR T[U + k]      (U the subsets of the lower bits: T's lower half),
    plus nu_k AND T[{k}] for G. The table halves at each fold; the first fold reads the dealt shares
    themselves (`Table.fold_top`): 2^size rows read and about as many written in all, with no
    coefficient table."""
    size = nu.shape[0]
    hi = size - 1
    t = _leaf_table(size).fold_top(party, a, mono, nu[hi])
    g = a[hi] & nu[hi]
    spare = torch.empty_like(t[: t.shape[0] // 2])
    for k in range(hi - 1, -1, -1):
        half = 1 << k
        low, high = t[:half], t[half : 2 * half]  # T[U], T[U + k]
        g ^= high[0] & nu[k]
        folded = spare[:half]
        torch.bitwise_and(low, nu[k], out=folded)
        folded ^= high
        t, spare = folded, t
    return g, t[0]


@cache
def _node_table(arity: int, need_e: bool) -> Table:
    """A node's table, in the order `_node` folds it."""
    hi = arity - 1
    rows: list[tuple[int, ...]] = [()]
    for c in range(hi):  # the children below the top, from the lowest up; without e, the lowest
        # child's e is in no product: its table is [constant, a_(g_0)]
        low_g_only = c == 0 and not need_e
        rows = [(), (arity,)] if low_g_only else [*rows, *[(c, *t) for t in rows], (arity + c,)]
    return Table.of(_node_products(arity, need_e), rows + [(hi, *t) for t in rows])


def _node(
    party: int, batch: Batch, d: dict[int, torch.Tensor], a: torch.Tensor, mono: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This party's shares of one batch of nodes from the opened d_v = v XOR a_v and its shares of the
    mask bits a and of the dealt monomials (in `_node_table` order): (the XOR of the
    products e_hi .. e_(low+1) g_low, which with g_hi makes the node's g; the node's e, if needed).

    Below the top, the children from hi - 1 down make a chain: G_c = g_c XOR e_c G_(c-1) (G over no
    child is 0) and E_c = e_c E_(c-1), and the products are e_hi G_(hi-1) and e_hi E_(hi-1). With
    v = d_v XOR a_v, each is a polynomial in the a bits with public coefficients, and a party's share
    is that linear map applied to its shares a_T of the products of a bits, held in one table:
        over no child: [the constant];   over c: [the table over c - 1, a_(e_c) times each of its
        subsets, a_(g_c)];              for the top: [the table over hi - 1, a_(e_hi) times each].
    Then G_c over a table t is d_(g_c) AND t[0] XOR t[a_(g_c)] XOR G_(c-1) over the fold
        t'[U] = d_(e_c) AND t[U] XOR t[e_c + U],
    E_c is E_(c-1) over the same fold, and the top is one fold along e_hi: each step halves the table.
    The lowest child's e is in no product unless e is needed, so its table is [constant, a_(g_0)]."""
    arity, hi = batch.arity, batch.arity - 1
    t = _node_table(arity, batch.need_e).fold_top(party, a, mono, d[hi])
    below = torch.zeros_like(t[0])
    for c in range(hi - 1, -1, -1):
        if c == 0 and not batch.need_e:
            return below.bitwise_xor_(t[0] & d[arity]).bitwise_xor_(t[1]), None
        half = (t.shape[0] - 1) // 2
        below.bitwise_xor_(t[0] & d[arity + c]).bitwise_xor_(t[2 * half])
        t = (t[:half] & d[c]).bitwise_xor_(t[half : 2 * half])
    return below, t[0]


def borrow(ctx: Ctx, u: torch.Tensor, sbits: torch.Tensor, R: CmpRand, nbits: int) -> Proto[torch.Tensor]:
    """XOR shares (W,) of [u mod 2^nbits < s mod 2^nbits] from public planes u and shared planes of s."""
    g, e = _leaf(ctx, u, sbits, R, nbits)
    for level, rands in zip(tree_levels(nbits, R.one)[1], R.levels, strict=True):
        opened = []
        for batch, (a, _) in zip(level, rands, strict=True):
            idx = torch.tensor(batch.nodes)  # (nodes, arity)
            v = torch.cat([e[idx].transpose(0, 1), g[idx].transpose(0, 1)], 0)  # (2*arity, nodes, W)
            used = _used(batch.spec)
            opened.append((v[used] ^ a[used]).contiguous())
        peer = yield opened  # one round: every batch of this level in one message
        gs, es = [], []
        for batch, (a, mono), mine, theirs in zip(level, rands, opened, peer, strict=True):
            d = dict(zip(_used(batch.spec), mine ^ theirs, strict=True))
            below, e_all = _node(ctx.party, batch, d, a, mono)
            top = torch.tensor([nd[-1] for nd in batch.nodes])
            gs.append((batch.nodes[0][0], g[top] ^ below))
            if e_all is not None:
                es.append((batch.nodes[0][0], e_all))
        gs.sort(key=lambda t: t[0])
        es.sort(key=lambda t: t[0])
        g = torch.cat([t[1] for t in gs], 0)
        e = torch.cat([t[1] for t in es], 0) if es else e
    return g[0]


def deal_sign_of_masked(src: Source, mask: MaskRand, n: int, L: int) -> CmpRand:
    assert mask.sbits is not None
    return deal_compare(src, mask.sbits, n, L)


def sign(ctx: Ctx, m: Masked, R: CmpRand) -> Proto[torch.Tensor]:
    """XOR shares (words) of [x >= 0] for x = m's value, |x| < 2^L. Tree rounds only."""
    L = ctx.cmp_bits
    assert m.sbits is not None
    u = planes(m.P + (1 << L), 0, L + 1)
    b = yield from borrow(ctx, u[:L], m.sbits[:L], R, L)
    b = b ^ m.sbits[L]
    return b ^ u[L] if ctx.party == 0 else b


# ---------------------------------------------------------------------------------------------
# Bit injection.


@dataclass
class InjectRand:
    beta: torch.Tensor  # XOR share words
    beta_a: torch.Tensor  # arithmetic shares of beta
    beta_s: torch.Tensor | None  # arithmetic shares of beta*s
    beta_m: torch.Tensor | None  # arithmetic shares of beta*m


def deal_inject(src: Source, n: int, mask: MaskRand | None, with_m: bool) -> InjectRand:
    beta = src.bits("beta", (words_for(n),))
    beta_a = src.ring_from("beta_a", (n,), lambda: unpack(beta, n))
    beta_s = beta_m = None
    if mask is not None:
        s = mask.s
        beta_s = src.ring_from("beta_s", (n,), lambda: unpack(beta, n) * s)
        if with_m and mask.m is not None:
            m = mask.m
            beta_m = src.ring_from("beta_m", (n,), lambda: unpack(beta, n) * m, bits=mask.shift)
    return InjectRand(beta, beta_a, beta_s, beta_m)


def open_bits(ctx: Ctx, b: torch.Tensor, R: InjectRand, n: int) -> Proto[torch.Tensor]:
    """Open d = b XOR beta (one round, one bit per element); returns d as 0/1 int64 (n,)."""
    (peer,) = yield [b ^ R.beta]
    return unpack(b ^ R.beta ^ peer, n)


def injected(ctx: Ctx, d: torch.Tensor, m: Masked, R: InjectRand) -> torch.Tensor:
    """Shares of b * x from the opened d = b XOR beta (local): with z = P [beta] - [beta s] (+ Q [beta m]),
    b x is z where d = 0 and P - [s] (+ Q [m]) - z where d = 1 (P from party 0 only), one select
    instead of the products by d and 1 - 2d."""
    assert R.beta_s is not None
    z = m.P * R.beta_a - R.beta_s
    flip = m.P - m.s if ctx.party == 0 else torch.neg(m.s)
    if m.Q is not None:
        assert R.beta_m is not None and m.m is not None
        z = z + m.Q * R.beta_m
        flip = flip + m.Q * m.m
    return torch.where(d.bool(), flip - z, z)


def arith_bit(ctx: Ctx, d: torch.Tensor, R: InjectRand) -> torch.Tensor:
    """Shares of b from the opened d = b XOR beta (local)."""
    out = (1 - 2 * d) * R.beta_a
    return out + d if ctx.party == 0 else out


def inject(ctx: Ctx, b: torch.Tensor, m: Masked, R: InjectRand) -> Proto[torch.Tensor]:
    """Arithmetic shares of b * x for shared bit words b and masked x (one round, 1 bit/element)."""
    d = yield from open_bits(ctx, b, R, m.s.numel())
    return injected(ctx, d, m, R)


def bit_to_arith(ctx: Ctx, b: torch.Tensor, R: InjectRand, n: int) -> Proto[torch.Tensor]:
    """Arithmetic shares (n,) of the XOR-shared bit words b (one round, 1 bit/element)."""
    d = yield from open_bits(ctx, b, R, n)
    return arith_bit(ctx, d, R)


def select(ctx: Ctx, b: torch.Tensor, m: Masked, R: InjectRand) -> Proto[tuple[torch.Tensor, torch.Tensor]]:
    """Arithmetic shares of b * x and of b itself from ONE opening of d = b XOR beta (one round,
    1 bit/element): what a piecewise function needs to select both a slope and an offset."""
    d = yield from open_bits(ctx, b, R, m.s.numel())
    return injected(ctx, d, m, R), arith_bit(ctx, d, R)


# ---------------------------------------------------------------------------------------------
# SecReLU.


@dataclass
class ReluRand:
    mask: MaskRand
    cmp: CmpRand
    inj: InjectRand
    form: bool = False  # the result is wanted in masked form (`relu_form`)


def deal_relu(src: Source, n: int, shift: int, L: int) -> ReluRand:
    mask = deal_mask(src, n, shift, L + 1)
    return ReluRand(mask, deal_sign_of_masked(src, mask, n, L), deal_inject(src, n, mask, shift > 0))


def inject_terms(R: ReluRand) -> list[tuple[torch.Tensor, int]]:
    """The dealer values an injected b * x is made of (`injected`), in `AffineForm` order: beta, beta s, s,
    and for a fused truncation m and beta m (mod 2^shift)."""
    assert R.inj.beta_s is not None
    terms = [(R.inj.beta_a, 64), (R.inj.beta_s, 64), (R.mask.s, 64)]
    if R.inj.beta_m is not None and R.mask.m is not None:
        terms += [(R.mask.m, R.mask.shift), (R.inj.beta_m, R.mask.shift)]
    return terms


def relu_form(ctx: Ctx, x: torch.Tensor, R: ReluRand, shift: int = 0) -> Proto[AffineForm]:
    """`relu`, keeping its output's masked form for a linear layer that takes it with no opening
    (`arith.form_linear`): b x = d P + k P [beta] - k [beta s] - d [s] + Q (d [m] + k [beta m]),
    k = 1 - 2d, d and P (and Q) public."""
    shape = x.shape
    m = yield from mask_open(ctx, x.reshape(-1), R.mask, shift)
    b = yield from sign(ctx, m, R.cmp)
    d = yield from open_bits(ctx, b, R.inj, m.s.numel())
    y = injected(ctx, d, m, R.inj)
    k = 1 - 2 * d
    coefs = [k * m.P, -k, -d]
    if m.Q is not None:
        coefs += [m.Q * d, m.Q * k]
    return AffineForm(y.reshape(shape), d * m.P, coefs)


def relu(ctx: Ctx, x: torch.Tensor, R: ReluRand, shift: int = 0) -> Proto[torch.Tensor]:
    """SecReLU(x) = [x >= 0] * x, optionally fused with truncation by `shift`.

    1. open c = x + r (or the truncation opening)       1 round, 8 bytes (6 with a 16-bit shift)
    2. sign bit by the comparison tree                    1 round up to ONE_ROUND_MAX elements
                                                          (10 bits for L = 32), else 2 (16 bits)
    3. inject the bit into x, reusing c as x's mask       1 round, 1 bit
    """
    shape = x.shape
    m = yield from mask_open(ctx, x.reshape(-1), R.mask, shift)
    b = yield from sign(ctx, m, R.cmp)
    y = yield from inject(ctx, b, m, R.inj)
    return y.reshape(shape)
