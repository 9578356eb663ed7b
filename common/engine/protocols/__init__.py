"""The SecDFD protocol suite, one family per module.

Every protocol is a generator: it yields the list of tensors this party opens in a round and
receives the peer's tensors of the same shapes. A scheduler (`secdfd.common.engine.evaluator`) runs many
protocol instances at once and batches all their openings of a round into one message. Each
protocol has a `deal_*` function that states its correlated randomness once; it runs on the dealer
and on both parties (see `secdfd.common.engine.randomness`).
"""
