"""Every credential the sandbox has issued: PATs, API keys, OAuth grants and codes.

Holds no lock of its own: the World calls it with its one lock held. Token values carry a
recognisable prefix (`cal_pat_`, `cal_at_`, `cal_rt_`, `close_at_`, `close_rt_`, `api_`,
`cal_code_`, `close_code_`) and 32 base64url characters (letters, digits, `-`, `_`) drawn from
the seeded random generator: the alphabet of real opaque tokens, so that the tests searching
logs and Sentry events for tokens meet the hard cases (no digit, dashes) too.

Documented choices (unknown in the docs): refreshing rotates the refresh token and leaves
the previous access token valid until it expires; reusing a spent refresh token fails with
`invalid_grant` but does not revoke the rest of the grant. Authorization codes are
single-use and bound to the client, the redirect URI and the PKCE challenge given at
authorize time.
"""

from __future__ import annotations

import base64
import hashlib
import random
from dataclasses import dataclass

_PREFIX = {
    ("calendly", "pat"): "cal_pat_",
    ("calendly", "access"): "cal_at_",
    ("calendly", "refresh"): "cal_rt_",
    ("calendly", "code"): "cal_code_",
    ("close", "api_key"): "api_",
    ("close", "access"): "close_at_",
    ("close", "refresh"): "close_rt_",
    ("close", "code"): "close_code_",
}


class GrantError(Exception):
    """An OAuth token request that must fail with RFC 6749 `error` and a description."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


@dataclass
class Token:
    """One credential; `user` is a Calendly user uuid or a Close user id."""

    value: str
    api: str
    kind: str  # pat | api_key | access | refresh
    user: str
    client_id: str | None
    scope: str
    issued_at: float
    expires_at: float | None = None
    revoked: bool = False
    # A Close OAuth token's organization: the one its user picked at authorize time.
    organization: str | None = None


@dataclass
class AuthCode:
    """An authorization code waiting to be exchanged."""

    value: str
    api: str
    user: str
    client_id: str
    redirect_uri: str | None
    challenge: str | None
    scope: str
    expires_at: float
    used: bool = False
    organization: str | None = None


@dataclass(frozen=True)
class Grant:
    """What a successful token request hands out."""

    access: Token
    refresh: Token


def pkce_challenge(verifier: str) -> str:
    """The S256 code challenge of a verifier (RFC 7636)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class TokenStore:
    """Issues, checks, rotates, expires and revokes credentials."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.tokens: dict[str, Token] = {}
        self.codes: dict[str, AuthCode] = {}

    def _value(self, api: str, kind: str) -> str:
        raw = base64.urlsafe_b64encode(self._rng.randbytes(24)).decode()
        return f"{_PREFIX[(api, kind)]}{raw}"

    def issue(
        self,
        api: str,
        kind: str,
        user: str,
        now: float,
        *,
        client_id: str | None = None,
        scope: str = "",
        ttl: float | None = None,
        organization: str | None = None,
    ) -> Token:
        """A new credential; `ttl` None means it never expires."""
        token = Token(
            value=self._value(api, kind),
            api=api,
            kind=kind,
            user=user,
            client_id=client_id,
            scope=scope,
            issued_at=now,
            expires_at=None if ttl is None else now + ttl,
            organization=organization,
        )
        self.tokens[token.value] = token
        return token

    def issue_grant(
        self,
        api: str,
        user: str,
        client_id: str,
        scope: str,
        ttl: float,
        now: float,
        organization: str | None = None,
    ) -> Grant:
        """An access token and its refresh token (of `organization`, for Close)."""
        access = self.issue(
            api,
            "access",
            user,
            now,
            client_id=client_id,
            scope=scope,
            ttl=ttl,
            organization=organization,
        )
        refresh = self.issue(
            api, "refresh", user, now, client_id=client_id, scope=scope, organization=organization
        )
        return Grant(access, refresh)

    def issue_code(
        self,
        api: str,
        user: str,
        client_id: str,
        redirect_uri: str | None,
        challenge: str | None,
        scope: str,
        expires_at: float,
        organization: str | None = None,
    ) -> AuthCode:
        """A single-use authorization code."""
        code = AuthCode(
            self._value(api, "code"),
            api,
            user,
            client_id,
            redirect_uri,
            challenge,
            scope,
            expires_at,
            organization=organization,
        )
        self.codes[code.value] = code
        return code

    def code_owner(self, api: str, value: str) -> str | None:
        """The user of a code, for per-user token-request limits; None if unknown."""
        code = self.codes.get(value)
        return code.user if code and code.api == api else None

    def refresh_owner(self, api: str, value: str) -> str | None:
        """The user of a refresh token, for per-user token-request limits."""
        token = self.tokens.get(value)
        return token.user if token and token.api == api and token.kind == "refresh" else None

    def redeem_code(
        self,
        api: str,
        value: str,
        client_id: str,
        redirect_uri: str | None,
        verifier: str | None,
        ttl: float,
        now: float,
    ) -> Grant:
        """Exchange a code for a grant, checking expiry, client, redirect URI and PKCE."""
        code = self.codes.get(value)
        if code is None or code.api != api or code.client_id != client_id:
            raise GrantError("invalid_grant", "The authorization code is invalid.")
        if code.used:
            raise GrantError("invalid_grant", "The authorization code has already been used.")
        if now >= code.expires_at:
            raise GrantError("invalid_grant", "The authorization code has expired.")
        if code.redirect_uri is not None and redirect_uri != code.redirect_uri:
            raise GrantError("invalid_grant", "The redirect_uri does not match.")
        if code.challenge is not None:
            if not verifier:
                raise GrantError("invalid_grant", "The code_verifier is missing.")
            if pkce_challenge(verifier) != code.challenge:
                raise GrantError("invalid_grant", "The code_verifier does not match.")
        code.used = True
        return self.issue_grant(api, code.user, client_id, code.scope, ttl, now, code.organization)

    def rotate(self, api: str, value: str, client_id: str, ttl: float, now: float) -> Grant:
        """Spend a refresh token for a new access token and a new refresh token."""
        old = self.tokens.get(value)
        if old is None or old.api != api or old.kind != "refresh" or old.client_id != client_id:
            raise GrantError("invalid_grant", "The refresh token is invalid.")
        if old.revoked:
            raise GrantError("invalid_grant", "The refresh token is invalid or already used.")
        old.revoked = True
        return self.issue_grant(api, old.user, client_id, old.scope, ttl, now, old.organization)

    def check(self, api: str, value: str, kinds: tuple[str, ...], now: float) -> Token | str:
        """The live token, or "invalid" / "expired" saying why it is refused."""
        token = self.tokens.get(value)
        if token is None or token.api != api or token.kind not in kinds or token.revoked:
            return "invalid"
        if token.expires_at is not None and now >= token.expires_at:
            return "expired"
        return token

    def expire(self, value: str | None, now: float) -> int:
        """Make one access token (or, with None, every access token) expired now."""
        hits = [t for t in self.tokens.values() if t.kind == "access"]
        if value is not None:
            hits = [t for t in hits if t.value == value]
        for token in hits:
            token.expires_at = now
        return len(hits)

    def revoke(self, value: str) -> bool:
        """Revoke any credential; True if it existed."""
        token = self.tokens.get(value)
        if token is None:
            return False
        token.revoked = True
        return True
