"""Bit-sliced boolean shares and products of shared bits.

Boolean (XOR) shares are bit-sliced: one int64 word holds one bit of 64 elements, so an AND or XOR
of whole words processes 64 elements at once. `planes` turns ring elements into bit planes with
three masked-shift stages of an 8x8 bit transpose plus byte shuffles, in place with one temporary
(half the time of the same stages with a fresh tensor per operation: 8 against 16 ms for 476,000
elements and 33 bits on the 2-core machine).

Products of shared bits (`Products`): every input bit is an affine form v = alpha XOR (beta AND a)
of a dealer bit `a` with public planes alpha, beta. Expanding prod(v_i for i in S) gives
XOR over T subset of S of  prod(alpha_i, i in S\\T) AND prod(beta_i, i in T) AND a_T,
where a_T is the AND of the dealer bits in T. With XOR shares of every a_T (|T| >= 2, dealt ahead)
and of each a_i, any such product is local. This single mechanism covers
- the leaves of a comparison (a = bits of the dealer's mask, alpha/beta from the public opening),
- fan-in-k AND gates (a = fresh masks, alpha = the opened d = v XOR a, beta = 1): one round for a
  k-input AND instead of log2(k).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import combinations

import torch

ONES = -1  # all 64 bits set


def words_for(n: int) -> int:
    """Number of 64-bit words that hold n bits."""
    return (n + 63) // 64


def planes(x: torch.Tensor, lo: int, count: int) -> torch.Tensor:
    """Bit planes of bits lo .. lo+count-1 of the int64 elements of x (flattened).

    Returns an int64 tensor (count, words_for(n)): bit i of word w of plane j is bit lo+j of element
    64*w + i. Elements beyond n (padding) are zero.
    """
    x = x.reshape(-1).contiguous()
    n = x.numel()
    pad = (-n) % 64
    shift, b0 = lo % 8, lo // 8
    if shift:
        x = x >> shift
    nbytes = (count + shift + 7) // 8 if shift else (count + 7) // 8
    nbytes = min(nbytes, 8 - b0)
    by = torch.zeros((nbytes, n + pad), dtype=torch.uint8, device=x.device)  # the padding: zero elements
    by[:, :n] = x.view(torch.uint8).view(-1, 8)[:, b0 : b0 + nbytes].t()
    w = by.view(torch.int64)  # word (b, q): byte b of elements 8q .. 8q+7
    # 8x8 bit transpose inside each word (Hacker's Delight, transpose8), in place: one temporary.
    t = torch.empty_like(w)
    for k, m in ((7, 0x00AA00AA00AA00AA), (14, 0x0000CCCC0000CCCC), (28, 0x00000000F0F0F0F0)):
        torch.bitwise_right_shift(w, k, out=t)
        t ^= w
        t &= m
        w ^= t
        t <<= k
        w ^= t
    y = w.view(torch.uint8).view(nbytes, -1, 8).transpose(1, 2).contiguous()
    return y.view(nbytes * 8, -1).view(torch.int64)[:count]


def pack(bits: torch.Tensor) -> torch.Tensor:
    """0/1 tensor (any shape, flattened) -> words (words_for(n),); bit i of word w is element 64w+i."""
    b = bits.reshape(-1).to(torch.uint8)
    n = b.numel()
    pad = words_for(n) * 64 - n
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)
    byte = (b.view(-1, 8) << shifts).sum(-1, dtype=torch.uint8)
    return byte.view(torch.int64)


def unpack(words: torch.Tensor, n: int) -> torch.Tensor:
    """Words (..., W) -> 0/1 int64 tensor (..., n): inverse of `pack` along the last axis."""
    lead = words.shape[:-1]
    u = words.contiguous().view(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=u.device)
    bits = ((u.unsqueeze(-1) >> shifts) & 1).reshape(*lead, -1)
    return bits[..., :n].to(torch.int64)


class Form:
    """Public planes of one affine form v = alpha XOR (beta AND a); None means 0 (alpha) or 1 (beta)."""

    __slots__ = ("alpha", "beta")

    def __init__(self, alpha: torch.Tensor | None, beta: torch.Tensor | None = None) -> None:
        self.alpha = alpha
        self.beta = beta


@dataclass(frozen=True)
class Products:
    """Which products of dealer-masked bits a protocol needs: the structure both sides agree on.

    `products[k]` is a tuple of distinct variable indices; the dealer deals XOR shares of a_T for
    every subset T (|T| >= 2) of every product, in the order of `monomials` (a comparison's leaves and
    nodes deal them in the order their fold reads them: `compare.Table`).
    """

    nvars: int
    products: tuple[tuple[int, ...], ...]

    @cached_property
    def monomials(self) -> tuple[tuple[int, ...], ...]:
        seen: dict[tuple[int, ...], None] = {}
        for p in self.products:
            vs = sorted(p)
            for k in range(2, len(vs) + 1):
                for t in combinations(vs, k):
                    seen.setdefault(t, None)
        return tuple(seen)

    @cached_property
    def index(self) -> dict[tuple[int, ...], int]:
        return {m: i for i, m in enumerate(self.monomials)}

    @cached_property
    def _by_size(self) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]:
        """Per monomial size 2, 3, ...: (the monomials of that size, each one's prefix T[:-1], its last
        variable). A prefix is a variable for size 2, else a monomial of the size below: every subset
        of a product is a monomial, so the prefix is one."""
        sizes: dict[int, list[tuple[int, int, int]]] = {}
        for i, m in enumerate(self.monomials):
            sizes.setdefault(len(m), []).append((i, m[0] if len(m) == 2 else self.index[m[:-1]], m[-1]))
        out = []
        for k in sorted(sizes):
            idx, prefix, last = zip(*sizes[k], strict=True)
            out.append((torch.tensor(idx), torch.tensor(prefix), torch.tensor(last)))
        return tuple(out)

    def deal(self, a: torch.Tensor) -> torch.Tensor:
        """Dealer: the monomial values (M, ...) from the full mask bits a (nvars, ...), one AND per
        monomial size over all monomials of that size (a_T = a_(T[:-1]) AND a_last)."""
        out = torch.empty((len(self.monomials), *a.shape[1:]), dtype=torch.int64, device=a.device)
        for k, (idx, prefix, last) in enumerate(self._by_size):
            out[idx] = (a if k == 0 else out)[prefix] & a[last]
        return out

    def _rows(self, prod: tuple[int, ...], live: tuple[int, ...]) -> torch.Tensor:
        """Rows of a_T in the table [constant 1, a_0 .. a_(n-1), monomials] for the subsets `live`
        (bit j of a subset = variable j of the product is in T)."""
        key = (prod, live)
        hit = self._row_cache.get(key)
        if hit is None:
            idx = []
            for t in live:
                T = tuple(sorted(prod[j] for j in range(len(prod)) if t >> j & 1))
                idx.append(0 if not T else 1 + T[0] if len(T) == 1 else 1 + self.nvars + self.index[T])
            hit = self._row_cache[key] = torch.tensor(idx)
        return hit

    @cached_property
    def _row_cache(self) -> dict[tuple[tuple[int, ...], tuple[int, ...]], torch.Tensor]:
        return {}

    @cached_property
    def _uniform(self) -> bool:
        """All products have the same length (a max's selectors): `_evaluate_stacked` applies."""
        return len({len(p) for p in self.products}) == 1

    @cached_property
    def _stacked_rows(self) -> torch.Tensor:
        """(products, 2^k): the table row of a_T for every subset T of each product, subset t holding
        variable j of the product when bit j of t is set."""
        every = tuple(range(1 << len(self.products[0])))
        return torch.stack([self._rows(p, every) for p in self.products])

    def _evaluate_stacked(self, forms: Sequence[Sequence[Form]], table: torch.Tensor) -> list[torch.Tensor]:
        """`evaluate` for products of one length whose forms are all v = alpha XOR a (a max's selectors:
        a comparison bit opened under the dealer's mask): every product at once, so a max-of-12's 11
        selectors of 11 variables take about 3 x 11 + 2 tensor operations instead of 11 times that.
        prod_j (alpha_j XOR a_j) = XOR over subsets T of a_T AND (the alphas of the variables not in T)."""
        return self._reduce_stacked(forms, table[self._stacked_rows])  # a fresh tensor, reduced in place

    def stacked_table(self, a: torch.Tensor, mono: torch.Tensor, party: int) -> torch.Tensor:
        """Offline: this party's shares of every a_T laid out (products, 2^k, ...) as `evaluate_stacked`
        reads them, the constant, the variables and the monomials gathered once ahead of the request
        (online, that gather was most of a max layer's selector step)."""
        return _table(a, mono, party)[self._stacked_rows]

    def evaluate_stacked(self, forms: Sequence[Sequence[Form]], table: torch.Tensor) -> list[torch.Tensor]:
        """`evaluate` for products of one length over opened bits (v = alpha XOR a), from a prepared
        `stacked_table`, which it consumes: the table is reduced in place, as randomness is used once."""
        if not self._uniform or tuple(table.shape[:2]) != (len(self.products), 1 << len(self.products[0])):
            raise ValueError("a stacked table of other products")
        if not all(f.beta is None and f.alpha is not None for fs in forms for f in fs):
            raise ValueError("stacked products take opened bits only")
        return self._reduce_stacked(forms, table)

    def _reduce_stacked(self, forms: Sequence[Sequence[Form]], x: torch.Tensor) -> list[torch.Tensor]:
        """XOR over the subsets T of x[product, T] AND (the alphas of the variables not in T); x, the
        shares of a_T (products, 2^k, ...), is reduced in place."""
        assert len(forms) == len(self.products)
        assert all(len(fs) == len(p) for fs, p in zip(forms, self.products, strict=True))
        alpha = torch.stack([torch.stack([f.alpha for f in fs]) for fs in forms])  # type: ignore[misc]
        coef = torch.full_like(alpha[:, :1], ONES)  # (products, 1, ...): the empty prefix
        for j in range(alpha.shape[1]):
            coef = torch.cat([coef & alpha[:, j : j + 1], coef], 1)  # subsets without j, then with j
        x &= coef
        while x.shape[1] > 1:
            h = x.shape[1] // 2
            x[:, :h] ^= x[:, h:]
            x = x[:, :h]
        return list(x[:, 0])

    def evaluate(
        self,
        forms: Sequence[Sequence[Form]],
        a: torch.Tensor,
        mono: torch.Tensor,
        party: int,
    ) -> list[torch.Tensor]:
        """This party's XOR shares of each product.

        forms[k][j] is the affine form of the j-th variable of product k; a (nvars, ...) and
        mono (M, ...) are this party's shares of the dealer bits and monomials.

        Vectorised over the subsets T: the coefficients of all 2^k subsets are built by doubling
        (one AND per half and variable), the shares a_T gathered in one index, and the XOR over T
        reduced by halving, so a k-input product costs about 3k + 3 tensor operations. Products that
        start with the same forms share their coefficient prefix. A max layer's selectors take the
        stacked path; a comparison's leaves and nodes fold their own tables (`compare.Table`) and are
        tested share for share against this general evaluation.
        """
        table = _table(a, mono, party)
        if self._uniform and all(f.beta is None and f.alpha is not None for fs in forms for f in fs):
            return self._evaluate_stacked(forms, table)
        ones = torch.full_like(a[:1], ONES)
        cache: dict[tuple[tuple[int, int], ...], tuple[torch.Tensor, tuple[int, ...]]] = {}
        out: list[torch.Tensor] = []
        for prod, fs in zip(self.products, forms, strict=True):
            coef: torch.Tensor = ones
            live: tuple[int, ...] = (0,)  # the subsets whose coefficient is not known to be zero
            key: tuple[tuple[int, int], ...] = ()
            for j, (v, f) in enumerate(zip(prod, fs, strict=True)):
                key = (*key, (v, id(f)))
                if key in cache:
                    coef, live = cache[key]
                    continue
                with_ = coef if f.beta is None else coef & f.beta
                grown = tuple(t | 1 << j for t in live)
                if f.alpha is None:  # v = beta AND a: every subset without v has coefficient 0
                    coef, live = with_, grown
                else:
                    coef, live = torch.cat([coef & f.alpha, with_]), live + grown
                cache[key] = (coef, live)
            x = table[self._rows(prod, live)]  # a fresh tensor (gathered), reduced in place
            x &= coef
            while x.shape[0] > 1:
                if x.shape[0] % 2:
                    x[0] ^= x[-1]
                    x = x[:-1]
                    continue
                h = x.shape[0] // 2
                x[:h] ^= x[h:]
                x = x[:h]
            out.append(x[0])
        return out


def _table(a: torch.Tensor, mono: torch.Tensor, party: int) -> torch.Tensor:
    """This party's shares of [constant 1, a_0 .. a_(n-1), monomials]: the table `Products` reads."""
    const = torch.full_like(a[:1], ONES) if party == 0 else torch.zeros_like(a[:1])
    return torch.cat([const, a, mono])
