"""Calendly's webhook signatures: parse `Calendly-Webhook-Signature`, sign, verify. Pure, no I/O.

A delivery proves it came from Calendly by `Calendly-Webhook-Signature: t=<unix>,v1=<hex>`, where
v1 is HMAC-SHA256(signing key, f"{t}." + raw body). Several `v1` may be present (a key being
rotated); one matching is enough. The timestamp must lie within `tolerance` seconds of the clock
the caller passes, in both directions: a captured delivery replayed later is stale, and one
claiming a time far ahead would outlive the receiver's replay memory (which lasts a bounded
time). The comparison is `hmac.compare_digest`, so the time it takes says nothing of how much of a
guessed signature was right.

The errors say which of the two answers a receiver owes: `MalformedSignature` (the header is
missing or unreadable: the request is not a delivery, 400) or `SignatureRejected` (well formed,
but not signed by this key now: 401). Their messages never contain the key, and name the header
and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

HEADER = "Calendly-Webhook-Signature"
# Headers longer than this are not read: a real one is a timestamp and one or two 64-hex digests.
MAX_HEADER_LENGTH = 1024
# Signatures read from one header at most (a key rotation gives two; more is noise).
MAX_SIGNATURES = 8
_HEX_DIGITS = frozenset("0123456789abcdef")


class MalformedSignature(ValueError):
    """The signature header is missing or unreadable: the request is refused (400)."""


class SignatureRejected(ValueError):
    """The header is readable but proves nothing: wrong signature, or a stale or future `t`."""


@dataclass(frozen=True)
class SignatureHeader:
    """A parsed `Calendly-Webhook-Signature`: the timestamp and each `v1` digest (lowercase hex)."""

    timestamp: int
    signatures: tuple[str, ...]


def parse_signature(header: str | None) -> SignatureHeader:
    """Read `t=<unix>,v1=<hex>[,v1=<hex>…]`; MalformedSignature naming what is wrong.

    Unknown schemes (`v0=…`, a future `v2=…`) are skipped, as Calendly may add some; at least one
    `v1` and exactly one `t` are required.
    """
    if header is None or not header.strip():
        raise MalformedSignature(f"the {HEADER} header is missing")
    if len(header) > MAX_HEADER_LENGTH:
        raise MalformedSignature(f"the {HEADER} header is longer than {MAX_HEADER_LENGTH} bytes")
    timestamps: list[str] = []
    signatures: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or not name:
            raise MalformedSignature(f"the {HEADER} header has an element without name=value")
        if name == "t":
            timestamps.append(value.strip())
        elif name == "v1":
            signatures.append(value.strip().lower())
    if len(timestamps) != 1:
        raise MalformedSignature(f"the {HEADER} header must carry exactly one t=")
    raw_t = timestamps[0]
    if not raw_t.isascii() or not raw_t.isdigit() or len(raw_t) > 12:
        raise MalformedSignature(f"the {HEADER} header's t= is not a unix time in seconds")
    if not signatures:
        raise MalformedSignature(f"the {HEADER} header carries no v1= signature")
    if len(signatures) > MAX_SIGNATURES:
        raise MalformedSignature(f"the {HEADER} header carries more than {MAX_SIGNATURES} v1=")
    for signature in signatures:
        if len(signature) != 64 or not set(signature) <= _HEX_DIGITS:
            raise MalformedSignature(f"the {HEADER} header's v1= is not 64 hex digits")
    return SignatureHeader(int(raw_t), tuple(signatures))


def sign(key: bytes, timestamp: int, body: bytes) -> str:
    """The v1 signature (hex) of `body` at `timestamp` under `key`."""
    return hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(key: bytes, timestamp: int, body: bytes) -> str:
    """The header Calendly would send for `body` at `timestamp` (for tests and the sandbox)."""
    return f"t={timestamp},v1={sign(key, timestamp, body)}"


def verify(
    header: SignatureHeader, body: bytes, key: bytes, *, now: float, tolerance: float
) -> None:
    """SignatureRejected unless one v1 is `body` signed with `key` at a `t` within `tolerance`
    seconds of `now` (either side).

    The digests are compared before the time is, each in constant time, so a forged request learns
    nothing from which check failed first but the (public) clock.
    """
    expected = sign(key, header.timestamp, body)
    matched = False
    for candidate in header.signatures:
        # Every candidate is compared: how many there are is the caller's, not the key's.
        matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureRejected(f"no v1 signature of the {HEADER} header matches the body")
    skew = now - header.timestamp
    if skew > tolerance:
        raise SignatureRejected(
            f"the {HEADER} timestamp is {skew:.0f} s old, beyond the {tolerance:g} s allowed"
        )
    if -skew > tolerance:
        raise SignatureRejected(
            f"the {HEADER} timestamp is {-skew:.0f} s ahead, beyond the {tolerance:g} s allowed"
        )


def delivery_digest(key: str, header: SignatureHeader, body: bytes) -> str:
    """What names one delivery for replay detection: the subscription, the timestamp, the body.

    Calendly signs each attempt anew, so a retry after our error is a new `t` and not a replay;
    the same signed request sent twice is.
    """
    digest = hashlib.sha256()
    digest.update(key.encode())
    digest.update(b"\0")
    digest.update(str(header.timestamp).encode())
    digest.update(b"\0")
    digest.update(body)
    return digest.hexdigest()
