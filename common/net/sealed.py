"""Files sealed to one party's CURVE public key, so that a weight share can travel by any channel.

A party's CURVE key is an X25519 key, so a file can be sealed to it without any other key material:

    sealed = MAGIC || E || ChaCha20-Poly1305(k, nonce 0, plaintext, associated data MAGIC || E || P)
    k      = HKDF-SHA256(X25519(e, P), salt = E || P, info = "secdfd sealed file v1")

with a fresh ephemeral keypair (e, E) per file and the recipient's public key P. Only the holder of
P's secret key derives k; the tag makes any change to the file an error. A key is used for one file
only, so the zero nonce is safe.
"""

from __future__ import annotations

import zmq
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secdfd.common.net.keys import KeyFileError

MAGIC = b"SECDFD-SEALED-1\n"
_INFO = b"secdfd sealed file v1"


def _raw(z85_key: bytes) -> bytes:
    raw = zmq.utils.z85.decode(z85_key)
    if len(raw) != 32:
        raise KeyFileError("a CURVE key is 32 bytes (40 z85 characters)")
    return bytes(raw)


def _key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=_INFO).derive(shared)


def is_sealed(data: bytes) -> bool:
    return data.startswith(MAGIC)


def seal(plaintext: bytes, recipient_public: bytes) -> bytes:
    """`plaintext` sealed to the CURVE public key `recipient_public` (z85)."""
    P = _raw(recipient_public)
    e = X25519PrivateKey.generate()
    E = e.public_key().public_bytes_raw()
    k = _key(e.exchange(X25519PublicKey.from_public_bytes(P)), E, P)
    return MAGIC + E + ChaCha20Poly1305(k).encrypt(bytes(12), plaintext, MAGIC + E + P)


def open_sealed(data: bytes, public: bytes, secret: bytes) -> bytes:
    """The plaintext of a file sealed to this party (its CURVE keypair, z85); KeyFileError if it was
    sealed to another key or changed on the way."""
    if not is_sealed(data) or len(data) < len(MAGIC) + 32 + 16:
        raise KeyFileError("not a sealed file")
    P, sk = _raw(public), _raw(secret)
    E = data[len(MAGIC) : len(MAGIC) + 32]
    k = _key(X25519PrivateKey.from_private_bytes(sk).exchange(X25519PublicKey.from_public_bytes(E)), E, P)
    try:
        return ChaCha20Poly1305(k).decrypt(bytes(12), data[len(MAGIC) + 32 :], MAGIC + E + P)
    except InvalidTag:
        raise KeyFileError("the file is sealed to another party's key, or it was changed on the way") from None
