"""The SecDFD protocol suite, one family per module: `arith` (openings, truncation, Beaver products,
linear layers with secret weights), `compare` (comparison trees, SecReLU, bit injection), `pool`
(maxima, SecMaxPool), `spline` (piecewise polynomials chosen by interval: Tanh, SiLU, GELU,
Hardswish), `sigmoid` (SecSigm, one such spline) and `piecewise` (exact piecewise-linear activations:
ReLU6, Hardtanh, clamps, LeakyReLU, Hardsigmoid).

Every protocol is a generator: it yields the list of tensors this party opens in a round and
receives the peer's tensors of the same shapes (`base.Proto`). The driver
(`secdfd.common.engine.driver`) runs many protocol instances at once and batches all their openings
of a round into one message. Each protocol has a `deal_*` function that states its correlated
randomness once; it runs on the dealer and on both parties (see `secdfd.common.engine.randomness`).
"""
