"""Calendly webhook signatures: parsing the header, signing, verifying (pure, literal values)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from closesync.core.webhook_signature import (
    MalformedSignature,
    SignatureHeader,
    SignatureRejected,
    delivery_digest,
    parse_signature,
    sign,
    signature_header,
    verify,
)

KEY = b"whsec-test-key"
NOW = 1_800_000_000
BODY = b'{"event":"event_type.updated","payload":{"uri":"https://api.calendly.com/event_types/E1"}}'


def _check(header: str, body: bytes = BODY, key: bytes = KEY, now: float = NOW) -> None:
    verify(parse_signature(header), body, key, now=now, tolerance=180)


def test_sign_literal_value_matches_hmac_sha256_of_t_dot_body() -> None:
    """The v1 digest is HMAC-SHA256(key, "t." + body), as Calendly documents."""
    assert sign(b"key", 1, b"{}") == (
        "1ba6b8171186efc613e8bcc0cbdab2748f24984d7c5a84faa2637afa0e40d224"
    )
    assert signature_header(b"key", 1, b"{}") == "t=1,v1=" + sign(b"key", 1, b"{}")


def test_verify_valid_signature_passes() -> None:
    """A body signed with the key at the current time verifies."""
    _check(signature_header(KEY, NOW, BODY))


def test_verify_tampered_body_is_rejected() -> None:
    """One byte changed in the body fails the signature."""
    header = signature_header(KEY, NOW, BODY)
    with pytest.raises(SignatureRejected, match="no v1 signature"):
        _check(header, body=BODY.replace(b"E1", b"E2"))


def test_verify_wrong_key_is_rejected() -> None:
    """A body signed with another key fails."""
    with pytest.raises(SignatureRejected, match="matches the body"):
        _check(signature_header(b"another key", NOW, BODY))


def test_verify_stale_timestamp_is_rejected() -> None:
    """A t older than the tolerance fails, naming how old it is."""
    with pytest.raises(SignatureRejected, match="181 s old"):
        _check(signature_header(KEY, NOW - 181, BODY))


def test_verify_future_timestamp_is_rejected() -> None:
    """A t further ahead than the tolerance fails too: the replay memory is bounded."""
    with pytest.raises(SignatureRejected, match="181 s ahead"):
        _check(signature_header(KEY, NOW + 181, BODY))


def test_verify_timestamp_at_the_edge_passes() -> None:
    """A t exactly the tolerance away, either side, still verifies."""
    _check(signature_header(KEY, NOW - 180, BODY))
    _check(signature_header(KEY, NOW + 180, BODY))


def test_verify_one_of_several_v1_matching_passes() -> None:
    """During a key rotation the header carries two v1: one matching is enough."""
    other = sign(b"old key", NOW, BODY)
    _check(f"t={NOW},v1={other},v1={sign(KEY, NOW, BODY)}")


def test_parse_signature_skips_unknown_schemes() -> None:
    """A v0= (or a future scheme) beside v1 is ignored."""
    digest = sign(KEY, NOW, BODY)
    assert parse_signature(f"t={NOW}, v0=abc, v1={digest.upper()}") == SignatureHeader(
        NOW, (digest,)
    )


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        (None, "missing"),
        ("   ", "missing"),
        ("v1=" + "a" * 64, "exactly one t="),
        (f"t={NOW},t={NOW},v1=" + "a" * 64, "exactly one t="),
        (f"t={NOW}", "no v1="),
        ("t=soon,v1=" + "a" * 64, "unix time"),
        ("t=-5,v1=" + "a" * 64, "unix time"),
        (f"t={NOW},v1=xyz", "64 hex digits"),
        (f"t={NOW},v1=" + "g" * 64, "64 hex digits"),
        (f"t={NOW},garbage", "name=value"),
        ("t=1," + "v1=" + "a" * 64 + "," * 2000, "longer than"),
        (f"t={NOW}," + ",".join(["v1=" + "a" * 64] * 9), "more than 8"),
    ],
)
def test_parse_signature_malformed_names_the_problem(header: str | None, problem: str) -> None:
    """A missing or malformed header is a MalformedSignature saying what is wrong."""
    with pytest.raises(MalformedSignature, match=problem):
        parse_signature(header)


def test_errors_never_contain_the_key() -> None:
    """No error message shows the signing key."""
    for header in (signature_header(b"x", NOW, BODY), signature_header(KEY, NOW - 999, BODY)):
        with pytest.raises(SignatureRejected) as caught:
            _check(header)
        assert KEY.decode() not in str(caught.value)


def test_delivery_digest_differs_by_key_timestamp_and_body() -> None:
    """The replay digest names one signed delivery to one subscription."""
    header = parse_signature(signature_header(KEY, NOW, BODY))
    later = parse_signature(signature_header(KEY, NOW + 1, BODY))
    base = delivery_digest("k1", header, BODY)
    assert base == delivery_digest("k1", header, BODY)
    assert len({base, delivery_digest("k2", header, BODY), delivery_digest("k1", later, BODY),
                delivery_digest("k1", header, BODY + b" ")}) == 4  # fmt: skip


keys = st.binary(min_size=1, max_size=64)
bodies = st.binary(max_size=2048)
times = st.integers(min_value=0, max_value=10**11)


@given(key=keys, body=bodies, t=times)
def test_property_any_body_signed_with_the_key_verifies(key: bytes, body: bytes, t: int) -> None:
    """Whatever the key, body and time, a body signed with the key at `t` verifies at `t`."""
    verify(parse_signature(signature_header(key, t, body)), body, key, now=t, tolerance=180)


@given(key=keys, body=bodies, t=times, other=bodies)
def test_property_changed_body_fails(key: bytes, body: bytes, t: int, other: bytes) -> None:
    """Any other body under the same signature fails."""
    assume(other != body)
    with pytest.raises(SignatureRejected):
        verify(parse_signature(signature_header(key, t, body)), other, key, now=t, tolerance=180)


@given(key=keys, body=bodies, t=times, other=keys)
def test_property_changed_key_fails(key: bytes, body: bytes, t: int, other: bytes) -> None:
    """Verifying with any other key fails."""
    assume(other != key)
    # HMAC pads short keys with zeros: b"k" and b"k\0" are the same key, not another one.
    assume(other.rstrip(b"\0") != key.rstrip(b"\0"))
    with pytest.raises(SignatureRejected):
        verify(parse_signature(signature_header(key, t, body)), body, other, now=t, tolerance=180)


@given(key=keys, body=bodies, t=times, shift=st.integers(min_value=1, max_value=10**6))
def test_property_changed_t_fails(key: bytes, body: bytes, t: int, shift: int) -> None:
    """The signature of one `t` presented with any other `t` fails."""
    digest = sign(key, t, body)
    moved = t + shift
    with pytest.raises(SignatureRejected):
        verify(parse_signature(f"t={moved},v1={digest}"), body, key, now=moved, tolerance=180)
