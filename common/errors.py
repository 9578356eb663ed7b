"""The small exception hierarchy of SecDFD.

Errors cross the wire by class name (never a pickled traceback); messages never contain secret
values, only peers, steps and what to do.
"""

from __future__ import annotations


class SecDFDError(Exception):
    """Base of every error SecDFD raises on purpose."""


class PlanError(SecDFDError):
    """A model cannot be lowered to secure steps (unsupported layer, bad shape)."""


class RandomnessError(SecDFDError):
    """Correlated randomness is missing, mismatched or was already consumed."""


class ProtocolError(SecDFDError):
    """A peer sent something malformed or out of step."""


class PeerTimeout(SecDFDError):
    """A peer did not answer within the deadline."""


class PeerLost(SecDFDError):
    """A peer is not reachable."""


class RemoteError(SecDFDError):
    """A peer reported an error."""


class Busy(SecDFDError):
    """A server holds as many requests as it may (for this client, or in all): retry later."""


class NotAdmitted(SecDFDError):
    """A party's key is not (or no longer) in the allow-list of the socket it talks to."""


class ModelError(SecDFDError):
    """A model name, file or input size is unknown, malformed or fails its checksum."""


class DataError(SecDFDError):
    """An image or a data folder cannot be used (not an image, too large, empty class folder)."""


class RangeError(SecDFDError):
    """A secure result lies outside the range the computation is exact in (no verdict from it)."""


ERRORS: dict[str, type[SecDFDError]] = {
    cls.__name__: cls
    for cls in (
        SecDFDError, PlanError, RandomnessError, ProtocolError, PeerTimeout, PeerLost, RemoteError, NotAdmitted, Busy,
        ModelError, DataError, RangeError,
    )
}
