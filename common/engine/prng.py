"""Cryptographically secure randomness streams.

Every random ring element, mask and bit in SecDFD comes from ChaCha20 (the `cryptography`
package), keyed by a 32-byte seed drawn from `secrets` and separated by purpose: the stream for
a purpose is ChaCha20(key = HKDF-free derivation SHA-256(seed || purpose), nonce = 0). torch's and
numpy's default generators are never used for anything secret.

Seed compression rests on this: a party that holds a seed can regenerate every "free" share the
dealer drew from it, so only derived corrections travel.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32


def new_seed() -> bytes:
    """A fresh 32-byte seed from the operating system's CSPRNG."""
    return secrets.token_bytes(SEED_BYTES)


class Stream:
    """A ChaCha20 keystream for one purpose, read as ring elements, bits or bytes.

    Streams are deterministic given (seed, purpose), so the dealer and the party holding the seed
    draw identical values in identical order.
    """

    def __init__(self, seed: bytes, purpose: str) -> None:
        if len(seed) != SEED_BYTES:
            raise ValueError("seed must be 32 bytes")
        key = hashlib.sha256(seed + b"\x00secdfd-stream\x00" + purpose.encode()).digest()
        nonce = bytes(16)  # each (seed, purpose) key is used for one stream only
        self._enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()

    def bytes(self, n: int) -> bytes:
        return self._enc.update(bytes(n))

    def ring(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Uniform elements of Z_2^64 as an int64 tensor."""
        n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        buf = bytearray(self._enc.update(bytes(8 * n)))
        return torch.frombuffer(buf, dtype=torch.int64).reshape(shape) if n else torch.zeros(
            shape, dtype=torch.int64
        )

    def words(self, n: int) -> torch.Tensor:
        """n uniform 64-bit words (bit-sliced random bits), as a 1-d int64 tensor."""
        return self.ring((n,))


def purpose(*parts: object) -> str:
    """A purpose label for domain separation, e.g. purpose('step', 12, 'a')."""
    return "/".join(str(p) for p in parts)
