"""Ring products for linear layers: int64 on CPU, float64 limbs where int64 conv/matmul is missing.

On CPU, torch's int64 matrix product is vectorised but its int64 convolution is not, so a
convolution runs as one int64 matrix product over a strided view of its input (`conv2d`): a 728x728
pointwise conv on 8x8 takes about 4 ms that way, 12 ms as ten float64 limb products and several
times more as an int64 `F.conv2d`. The products wrap mod 2^64 exactly as the ring does.

CUDA has no int64 convolution or matrix product. A ring element splits into four unsigned 16-bit
limbs, x = sum_i x_i 2^(16 i); the product mod 2^64 keeps the ten limb pairs with i + j < 4:
    op(x, w) = sum_{i + j < 4} op(x_i, w_j) 2^(16 (i + j))   (mod 2^64).
Each op(x_i, w_j) sums at most K products of two 16-bit values, exact in float64 while
K * 2^32 < 2^53, i.e. for reductions up to 2^21 terms, far above any layer here (K <= 6552 for
DFDNet). The limb path is selectable on CPU too, where the tests check it bit for bit against int64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LIMB_BITS = 16
LIMBS = 64 // LIMB_BITS
MAX_REDUCTION = 1 << (53 - 2 * LIMB_BITS)

Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def conv2d(x: torch.Tensor, w: torch.Tensor, stride: int = 1, padding: int = 0, dilation: int = 1,
           groups: int = 1) -> torch.Tensor:
    """F.conv2d(x, w) for int64 x (N, C, H, W) and w (O, C / groups, kh, kw), mod 2^64: the im2col
    columns of x are a strided view (copied once by the reshape; a 1x1 conv without stride copies
    nothing), multiplied by w as a (groups, O / groups, C / groups kh kw) stack of matrices."""
    N, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    if padding:
        x = torch.nn.functional.pad(x, (padding,) * 4)
    Ho = (H + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    Wo = (W + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    sN, sC, sH, sW = x.stride()
    cols = x.as_strided((N, C, kh, kw, Ho, Wo), (sN, sC, dilation * sH, dilation * sW, stride * sH, stride * sW),
                        x.storage_offset())
    if groups == 1:
        return (w.reshape(O, Cg * kh * kw) @ cols.reshape(N, Cg * kh * kw, Ho * Wo)).view(N, O, Ho, Wo)
    y = w.reshape(groups, O // groups, Cg * kh * kw) @ cols.reshape(N, groups, Cg * kh * kw, Ho * Wo)
    return y.view(N, O, Ho, Wo)


def _limbs(x: torch.Tensor) -> list[torch.Tensor]:
    mask = (1 << LIMB_BITS) - 1
    return [((x >> (LIMB_BITS * i)) & mask).to(torch.float64) for i in range(LIMBS)]


def limb_product(op: Op, x: torch.Tensor, w: torch.Tensor, reduction: int) -> torch.Tensor:
    """op(x, w) mod 2^64 for a bilinear op, computed with float64 products of 16-bit limbs."""
    if reduction >= MAX_REDUCTION:
        raise ValueError(f"a reduction over {reduction} terms is too long for exact float64 limbs")
    xl, wl = _limbs(x), _limbs(w)
    out: torch.Tensor | None = None
    for i in range(LIMBS):
        for j in range(LIMBS - i):
            # rounded, not truncated: a GPU conv (FFT, Winograd) may return 3.9999999 for 4, and a
            # truncated limb product would be off by one unit of 2^(16 (i + j)) in the ring
            part = torch.round(op(xl[i], wl[j])).to(torch.int64) << (LIMB_BITS * (i + j))
            out = part if out is None else out + part
    assert out is not None
    return out


def split_limbs(w: torch.Tensor) -> list[torch.Tensor]:
    """A fixed operand's four limbs, kept as float32 (exact: each is below 2^16), to be reused by
    `limb_product_split` on every call."""
    return [limb.to(torch.float32) for limb in _limbs(w)]


def limb_product_split(op: Op, x: torch.Tensor, wl: list[torch.Tensor]) -> torch.Tensor:
    """op(x, w) mod 2^64 as `limb_product`, with w already split (`split_limbs`): the CUDA path."""
    xl = _limbs(x)
    out: torch.Tensor | None = None
    for j in range(LIMBS):
        wj = wl[j].to(torch.float64)
        for i in range(LIMBS - j):
            part = torch.round(op(xl[i], wj)).to(torch.int64) << (LIMB_BITS * (i + j))
            out = part if out is None else out + part
    assert out is not None
    return out


def ring_op(op: Op, reduction: int, limbs: bool) -> Op:
    """The ring version of a bilinear op: native int64, or float64 limbs."""
    if limbs:
        return lambda x, w: limb_product(op, x, w, reduction)
    return op
