"""The moving parts of an OAuth authorization-code flow: `state`, PKCE, authorize URLs, and the
pending flow kept in Redis between the redirect and the callback.

`state` binds a callback to the flow that started it (RFC 6749 §10.12): it is random, kept in
Redis only as a SHA-256 digest, lives `STATE_TTL_SECONDS`, and is consumed with GETDEL, so a
replayed or forged callback finds nothing. A flow is also bound to whoever started it (login
CSRF: a `state` handed to someone else must not finish there): it carries the SHA-256 digest of
a `binding` secret, a cookie of the browser for `closesync web`, a per-run secret for the
terminal flow, and a callback presenting another secret is refused (`binding_matches`).
What a pending flow carries (the PKCE verifier, the Close grant waiting for its Calendly side)
is sealed by the store's SecretBox like every grant.

This module does not call the providers nor store connections: `closesync.connect.connector` does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit

import redis

from closesync.core.connection import Side
from closesync.settings import Settings
from closesync.store.client import guard
from closesync.store.keys import Keys, Owner
from closesync.store.secretbox import SecretBox

# personal: a user connects their own accounts; organization: an owner or admin connects the
# shared Calendly credential of their organization (`closesync.connect.organizations`).
Purpose = Literal["personal", "organization"]

# Seconds a started flow stays redeemable: long enough to sign in and pick an organization,
# short enough that a leaked `state` is soon worthless.
STATE_TTL_SECONDS = 600
# Calendly's scopes (api-facts.md): users, event types, organization members, and the webhook
# subscriptions closesync owns (asked even with WEBHOOKS_ENABLED=false, so that turning webhooks
# on later needs no user to authorize again).
CALENDLY_SCOPES = "users:read event_types:read organizations:read webhooks:read webhooks:write"
_REAL_CLOSE_API_HOST = "api.close.com"


def new_state() -> str:
    """A fresh, unguessable `state` value (256 bits)."""
    return secrets.token_urlsafe(32)


def new_binding() -> str:
    """A fresh browser (or terminal run) binding secret (256 bits)."""
    return secrets.token_urlsafe(32)


def binding_digest(binding: str) -> str:
    """What a pending flow stores of its binding secret: never the secret itself."""
    return hashlib.sha256(binding.encode()).hexdigest()


def binding_matches(flow: PendingFlow, binding: str | None) -> bool:
    """Whether `binding` is the secret the flow was started with (constant-time compare)."""
    if not flow.binding or not binding:
        return False
    return hmac.compare_digest(flow.binding, binding_digest(binding))


def pkce_pair() -> tuple[str, str]:
    """(verifier, S256 challenge) per RFC 7636: 43..128 unreserved characters, then hashed."""
    verifier = secrets.token_urlsafe(64)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def redirect_uri(base_url: str, provider: Side) -> str:
    """The callback URL of `provider` under `base_url` (PUBLIC_BASE_URL or a loopback)."""
    return f"{base_url.rstrip('/')}/oauth/{provider}/callback"


def close_authorize_endpoint(settings: Settings) -> str:
    """Close's authorize page: app.close.com for the real API, else beside the token endpoint.

    Close serves the page on app.close.com and the token endpoint on api.close.com; the sandbox
    (and any test double) serves both on one host, under CLOSE_OAUTH_URL.
    """
    if urlsplit(settings.close_oauth_url).hostname == _REAL_CLOSE_API_HOST:
        return "https://app.close.com/oauth2/authorize/"
    return f"{settings.close_oauth_url.rstrip('/')}/authorize/"


def calendly_authorize_endpoint(settings: Settings) -> str:
    return f"{settings.calendly_auth_url.rstrip('/')}/oauth/authorize"


def authorize_url(
    settings: Settings, provider: Side, state: str, callback: str, challenge: str | None
) -> str:
    """Where to send the user's browser to authorize `provider`."""
    if provider == "close":
        params = {
            "client_id": settings.close_client_id or "",
            "response_type": "code",
            "redirect_uri": callback,
            "state": state,
        }
        return f"{close_authorize_endpoint(settings)}?{urlencode(params)}"
    params = {
        "client_id": settings.calendly_client_id or "",
        "response_type": "code",
        "redirect_uri": callback,
        "state": state,
        "scope": CALENDLY_SCOPES,
    }
    if challenge is not None:
        params.update(code_challenge=challenge, code_challenge_method="S256")
    return f"{calendly_authorize_endpoint(settings)}?{urlencode(params)}"


@dataclass(frozen=True)
class PendingFlow:
    """One started authorization, as the callback will need it. Sealed in Redis: holds secrets."""

    provider: Side
    purpose: Purpose
    redirect_uri: str
    code_verifier: str | None = field(default=None, repr=False)
    # Close grant and user of the first step, waiting for the Calendly step (grant fields as
    # `closesync.store.connections.grant_json` writes them); an organization flow carries the
    # admin's user alone (`me`: their Close organization binds the credential). Never printed.
    close: dict[str, Any] | None = field(default=None, repr=False)
    # A name the user gave the connection when starting (`closesync connect --name`).
    name: str | None = None
    # `binding_digest` of the secret of the browser (or terminal run) that started the flow; a
    # callback must present that secret. None (never written by this version) matches nothing.
    binding: str | None = None


class FlowStates:
    """Pending flows by `state`: stored sealed with a short TTL, taken at most once."""

    def __init__(self, client: redis.Redis, keys: Keys, box: SecretBox) -> None:
        self.redis = client
        self.keys = keys
        self.box = box

    @staticmethod
    def _digest(state: str) -> str:
        return hashlib.sha256(state.encode()).hexdigest()

    @guard("starting an OAuth flow")
    def put(self, flow: PendingFlow, ttl_seconds: int = STATE_TTL_SECONDS) -> str:
        """Remember `flow` under a new `state`, which is returned; sealed for that `state`."""
        state = new_state()
        digest = self._digest(state)
        sealed = self.box.seal(json.dumps(asdict(flow)).encode(), owner=Owner.oauth_flow(digest))
        self.redis.set(self.keys.oauth_state(digest), sealed, ex=ttl_seconds)
        return state

    @guard("finishing an OAuth flow")
    def take(self, state: str | None) -> PendingFlow | None:
        """The flow started with `state`, consumed; None when unknown, expired or used."""
        if not state:
            return None
        digest = self._digest(state)
        sealed = self.redis.getdel(self.keys.oauth_state(digest))
        if sealed is None:
            return None
        text = sealed.decode() if isinstance(sealed, bytes) else str(sealed)
        return PendingFlow(**json.loads(self.box.open(text, owner=Owner.oauth_flow(digest))))

    def start(
        self, settings: Settings, flow: PendingFlow, *, verifier_challenge: bool = True
    ) -> tuple[str, str]:
        """Store `flow` (adding a PKCE verifier for Calendly) and return (state, authorize URL)."""
        challenge = None
        if flow.provider == "calendly" and verifier_challenge:
            verifier, challenge = pkce_pair()
            flow = PendingFlow(**{**asdict(flow), "code_verifier": verifier})
        state = self.put(flow)
        return state, authorize_url(settings, flow.provider, state, flow.redirect_uri, challenge)
