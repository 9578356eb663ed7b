"""The secure evaluation engine: everything two parties need to evaluate a model on secret shares.

Fixed point in Z_2^64 (`ring`), CSPRNG streams (`prng`), bit-sliced shares (`bits`), additive
sharing (`sharing`), correlated randomness run by dealer and parties alike (`randomness`), the
protocol suite (`protocols/`), the driver that batches protocol rounds (`driver`), the model lowered
to typed steps (`plan`, `steps`), one party's evaluator and the dealer (`evaluator`), per-step
figures (`figures`) and both parties in one process (`twoparty`).

May import: `secdfd.common.errors` only. Knows nothing of networks, processes or files.
"""
