"""A connection that a user makes themselves: the OAuth steps shared by `closesync web` and
`closesync connect`, from starting a flow to storing the connection.

Personal mode: Close first, then Calendly (PKCE); the connection is stored only when both callbacks
succeeded; the Close grant waits between the two steps inside the sealed pending flow. Organization
mode (a shared Calendly credential bound to the user's Close organization exists): the Close step
alone pairs the user by email (`closesync.connect.organizations`). Connecting an organization
authorizes Close first too, to learn the admin's Close organization, which the Calendly credential
is bound to (only its users are ever paired with the members); that Close grant is revoked at
once, only the admin's public Close identity waits in the pending flow. CLOSE_ORGANIZATION_IDS,
when set, refuses any other Close organization at the Close step of either flow.

Every failure (a denied consent, an unknown, expired or replayed `state`, a callback from another
browser than the one that started the flow, a refused code, a Calendly user another connection
already has) raises `FlowError` with a message fit for the user, and stores nothing: tokens
obtained before the failure are revoked at the provider, best effort. A grant once stored is never
revoked by a later failure of the same step (an organization's members failing to list after it
connected).

Every flow is bound (`oauth_flow.binding_matches`): `start` takes the starter's secret, the
Close -> Calendly hop carries its digest, and a callback presenting another secret is refused
before any code is redeemed.

Nothing here prints or logs a token, a code or a `state`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import SecretStr

from closesync.apis.calendly.client import CalendlyClient
from closesync.apis.close.client import CloseClient
from closesync.connect.deps import ConnectServices
from closesync.connect.oauth_flow import (
    FlowStates,
    PendingFlow,
    Purpose,
    binding_digest,
    binding_matches,
    redirect_uri,
)
from closesync.connect.org_credentials import OrganizationBusy
from closesync.connect.organizations import Organizations
from closesync.connect.revoke import revoke_grant
from closesync.connect.saving import ConnectionBusy, save_connection
from closesync.connect.steps import KNOWN_ERRORS, FlowError, Step
from closesync.connect.webhooks import Subscriptions
from closesync.core.calendly_payloads import TokenResponse as CalendlyToken
from closesync.core.calendly_payloads import uuid_of
from closesync.core.close_payloads import Me
from closesync.core.close_payloads import TokenResponse as CloseToken
from closesync.core.connection import (
    SIDE_LABEL,
    Connection,
    Grant,
    Grants,
    Side,
    connection_between,
)
from closesync.core.errors import ApiError, ConfigError, GrantRevoked, PairingRefused
from closesync.core.retry import WaitBudget

log = logging.getLogger(__name__)

_ADMIN_ROLES = ("owner", "admin")


def _grant(answer: CloseToken | CalendlyToken) -> Grant:
    return Grant(
        kind="oauth",
        access_token=SecretStr(answer.access_token),
        refresh_token=SecretStr(answer.refresh_token) if answer.refresh_token else None,
        expires_at=time.time() + answer.expires_in if answer.expires_in else None,
    )


def _taken(error: PairingRefused, whose: str) -> FlowError:
    """The page of a pairing refused because another connection has that Calendly user.

    It names the other connection (for whoever runs closesync) but not its Close user.
    """
    return FlowError(
        "taken",
        f"{whose} is already connected to another Close user (connection {error.connection_id}),"
        " and a Calendly user can have only one connection. Nothing was stored; ask whoever "
        "runs closesync to remove that connection first.",
    )


def _apps_missing(*providers: Side) -> ConfigError:
    """The error naming the OAuth application settings of `providers` that are not set."""
    names = " and ".join(f"{p.upper()}_CLIENT_ID and {p.upper()}_CLIENT_SECRET" for p in providers)
    return ConfigError(f"set {names} (the OAuth application's credentials) to connect")


class Connector:
    """Starts and finishes authorizations for callbacks under `base_url`."""

    def __init__(self, services: ConnectServices, base_url: str) -> None:
        self.services = services
        self.settings = services.settings
        self.base_url = base_url
        self.states = FlowStates(services.redis, services.keys, services.box)
        self.orgs = Organizations(services)

    # -- starting ----------------------------------------------------------------------------

    def require_apps(self, *providers: Side) -> None:
        """ConfigError naming the missing OAuth application settings."""
        missing = [
            p
            for p in providers
            if (self.services.close_oauth() if p == "close" else self.services.calendly_oauth())
            is None
        ]
        if missing:
            raise _apps_missing(*missing)

    def start(self, purpose: Purpose, binding: str, name: str | None = None) -> str:
        """A new flow's first authorize URL: Close, for a person and an organization alike.

        `binding` is the starter's secret (browser cookie, terminal run); only a callback that
        presents it again can finish the flow. Both OAuth apps are checked, so a missing
        Calendly app is said now, not after the user approved Close.
        """
        self.require_apps("close", "calendly")
        flow = PendingFlow(
            provider="close",
            purpose=purpose,
            redirect_uri=redirect_uri(self.base_url, "close"),
            name=name,
            binding=binding_digest(binding),
        )
        return self.states.start(self.settings, flow)[1]

    # -- finishing ---------------------------------------------------------------------------

    def callback(self, provider: Side, params: dict[str, str], binding: str | None) -> Step:
        """Finish one step from the callback's query parameters and the caller's binding."""
        flow = self.states.take(params.get("state"))
        if flow is None or flow.provider != provider:
            if flow is not None:
                self._revoke_pending(flow)
            raise FlowError(
                "state",
                "This authorization is unknown, has expired or was already used. Nothing was "
                "stored; please start again.",
            )
        if not binding_matches(flow, binding):
            # Login CSRF: someone else's flow (maybe holding their Close grant) handed to this
            # browser. The flow is consumed and its grant revoked; the code is never redeemed.
            self._revoke_pending(flow)
            log.warning("refused a callback from another browser than the flow's")
            raise FlowError(
                "browser",
                "This authorization was not started in this browser, so it was refused and "
                "nothing was stored. If you meant to connect, start again from the beginning.",
            )
        error = params.get("error")
        if error or not params.get("code"):
            self._revoke_pending(flow)
            if error == "access_denied":
                raise FlowError(
                    "denied",
                    f"You declined access to {SIDE_LABEL[provider]}. Nothing was stored; start "
                    "again whenever you like.",
                )
            if error in KNOWN_ERRORS:
                said = f"answered {error}"
            elif error:
                said = "returned an error"
            else:
                said = "sent no authorization code"
            raise FlowError(
                "provider",
                f"{SIDE_LABEL[provider]} {said}. Nothing was stored; please start again.",
            )
        code = params["code"]
        if provider == "close":
            return self._close_step(flow, code)
        return self._calendly_step(flow, code)

    def _exchange(self, flow: PendingFlow, code: str) -> CloseToken | CalendlyToken:
        try:
            answer: CloseToken | CalendlyToken
            if flow.provider == "close":
                close = self.services.close_oauth()
                if close is None:
                    raise _apps_missing("close")
                answer = close.exchange_code(code, flow.redirect_uri)
            else:
                calendly = self.services.calendly_oauth()
                if calendly is None:
                    raise _apps_missing("calendly")
                answer = calendly.exchange_code(code, flow.redirect_uri, flow.code_verifier)
        except GrantRevoked:
            self._revoke_pending(flow)
            raise FlowError(
                "code",
                f"The {SIDE_LABEL[flow.provider]} authorization code has expired or was already "
                "used. Nothing was stored; please start again.",
            ) from None
        except ApiError as error:
            self._revoke_pending(flow)
            raise FlowError(
                "provider", f"Could not finish: {error}. Nothing was stored; please start again."
            ) from None
        return answer

    def _close_step(self, flow: PendingFlow, code: str) -> Step:
        answer = self._exchange(flow, code)
        grant = _grant(answer)
        try:
            me = self._close_client(grant).get_me()
        except ApiError as error:
            self._revoke("close", grant)
            raise FlowError("provider", f"Close did not answer who you are: {error}") from None
        # The organization the user picked at consent, which the token is scoped to: /me/ lists
        # all of theirs. Everything below (allowlist, pairing, binding) goes by this one.
        me = me.for_token(answer.organization_id if isinstance(answer, CloseToken) else None)
        if not self.settings.close_organization_allowed(me.organization_id):
            self._revoke("close", grant)
            log.warning("refused a Close organization outside CLOSE_ORGANIZATION_IDS")
            raise FlowError(
                "not_allowed",
                "This Close organization is not one this closesync serves "
                "(CLOSE_ORGANIZATION_IDS). Nothing was stored.",
            )
        if flow.purpose == "organization":
            # Only who the admin is, and in which Close organization, is needed: not the grant.
            self._revoke("close", grant)
            if me.organization_id is None:
                raise FlowError(
                    "provider",
                    "Close did not say which organization you belong to. Nothing was stored; "
                    "please start again.",
                )
            return self._to_calendly(
                flow,
                {"me": me.model_dump(mode="json")},
                "Close is authorized; now authorize Calendly as an owner or admin of the "
                "organization.",
            )
        if self.orgs.credentials.refs_for(me.organization_id):
            try:
                connection = self.orgs.pair_close_user(me, grant, flow.name)
            except ApiError as error:
                self._revoke("close", grant)
                raise FlowError(
                    "provider",
                    f"The Calendly organization's members could not be listed: {error}. Nothing "
                    "was stored; please try again later.",
                ) from None
            except PairingRefused as error:
                self._revoke("close", grant)
                raise _taken(error, "The Calendly member with your email") from None
            except ConnectionBusy as error:
                self._revoke("close", grant)  # not stored
                raise FlowError(
                    "provider", f"Not connected: {error}. Nothing was stored; please try again."
                ) from None
            if connection is None:
                return Step(
                    "waiting",
                    f"Close is connected for {me.email or me.id}, but no member of the Calendly "
                    "organization has that email yet: you will be paired when one does.",
                )
            return Step(
                "connected",
                f"Connected: Close {me.email or me.id} <- Calendly {connection.calendly_email}.",
                connection=connection,
            )
        if self.services.calendly_oauth() is None:
            self._revoke("close", grant)
            self.require_apps("calendly")
        close_part = {"grant": grant.revealed(), "me": me.model_dump(mode="json")}
        return self._to_calendly(flow, close_part, "Close is authorized; now authorize Calendly.")

    def _to_calendly(self, flow: PendingFlow, close_part: dict[str, Any], message: str) -> Step:
        """The Calendly step of `flow`, carrying what its Close step learnt (sealed)."""
        nxt = PendingFlow(
            provider="calendly",
            purpose=flow.purpose,
            redirect_uri=redirect_uri(self.base_url, "calendly"),
            close=close_part,
            name=flow.name,
            binding=flow.binding,
        )
        url = self.states.start(self.settings, nxt)[1]
        return Step("next", message, next_url=url)

    def _calendly_step(self, flow: PendingFlow, code: str) -> Step:
        if flow.close is None:
            # Both flows authorize Close first (an organization flow to learn the admin's Close
            # organization); a flow without that step is not one this version started.
            raise FlowError("state", "This Calendly authorization has no Close step; start again.")
        grant = _grant(self._exchange(flow, code))
        client = self._calendly_client(grant)
        try:
            user = client.get_current_user()
        except ApiError as error:
            self._revoke("calendly", grant)
            self._revoke_pending(flow)
            raise FlowError("provider", f"Calendly did not answer who you are: {error}") from None
        me = Me.model_validate(flow.close["me"])
        if flow.purpose == "organization":
            return self._organization(
                client, user.uri, user.email, user.current_organization, grant, me
            )
        close_grant = Grant.model_validate(flow.close["grant"])
        existing: Connection | None = self.services.connections.find_by_close_user(me.id)
        now = time.time()
        connection = connection_between(existing, me, user, name=flow.name, now=now)
        try:
            # Under the refresh locks of the grants it replaces, which it then revokes.
            save_connection(
                self.services, existing, connection, Grants(close=close_grant, calendly=grant)
            )
        except PairingRefused as error:
            self._revoke("calendly", grant)
            self._revoke("close", close_grant)
            raise _taken(error, "This Calendly account") from None
        except ConnectionBusy as error:
            self._revoke("calendly", grant)  # neither was stored
            self._revoke("close", close_grant)
            raise FlowError(
                "provider", f"Not connected: {error}. Nothing was stored; please try again."
            ) from None
        log.info("connection authorized", extra={"connection_id": connection.id})
        verb = "Updated" if existing else "Connected"
        return Step(
            "connected",
            f"{verb}: Close {me.email or me.id} <- Calendly {user.email or user.uri}.",
            connection=connection,
        )

    def _organization(
        self,
        client: CalendlyClient,
        user_uri: str,
        email: str | None,
        organization_uri: str | None,
        grant: Grant,
        admin: Me,
    ) -> Step:
        allowed = self.settings.calendly_organizations()
        if organization_uri is not None and allowed and organization_uri.rstrip("/") not in allowed:
            self._revoke("calendly", grant)
            log.warning("refused a Calendly organization outside CALENDLY_ORGANIZATION_URIS")
            raise FlowError(
                "not_allowed",
                "This Calendly organization is not one this closesync serves "
                "(CALENDLY_ORGANIZATION_URIS). Nothing was stored.",
            )
        role = None
        if organization_uri is not None:
            try:
                role = next(
                    (
                        m.role
                        for m in client.iter_organization_memberships(organization_uri, email)
                        if m.user.uri == user_uri
                    ),
                    None,
                )
            except ApiError as error:
                self._revoke("calendly", grant)
                raise FlowError(
                    "provider",
                    f"Calendly did not say whether you administer the organization: {error}. "
                    "Nothing was stored; please try again.",
                ) from None
        if organization_uri is None or role not in _ADMIN_ROLES:
            self._revoke("calendly", grant)
            raise FlowError(
                "not_admin",
                "Only an owner or admin of the Calendly organization can connect it. Nothing "
                "was stored.",
            )
        close_org = admin.organization_id
        assert close_org is not None  # noqa: S101 - the Close step refused an admin without one
        elsewhere = self.orgs.credentials.users_elsewhere(organization_uri, close_org)
        bound = self.orgs.credentials.bound_to(uuid_of(organization_uri))
        # Close users of the bound organization waiting for their member use it too.
        waiting = self.orgs.waiting_room.waiting_in(bound) if bound != close_org else []
        if elsewhere or waiting:
            # Rebinding would pair this Close organization's users beside another's.
            self._revoke("calendly", grant)
            raise FlowError(
                "not_allowed",
                "This Calendly organization is already connected for another Close organization "
                f"({len(elsewhere)} connection(s) use it, {len(waiting)} Close user(s) wait for "
                "it). Nothing was stored.",
            )
        try:
            ref = self.orgs.credentials.connect(
                organization_uri, user_uri, email, grant, close_admin=admin
            )
        except OrganizationBusy as error:
            self._revoke("calendly", grant)  # not stored: the lock was never ours
            raise FlowError(
                "provider", f"Not connected: {error}. Nothing was stored; please try again."
            ) from None
        # From here the grant is stored and shared: nothing below may revoke it.
        Subscriptions(self.services).after_organization(ref)
        try:
            paired = self.orgs.pair_waiting()
        except (ApiError, ConnectionBusy) as error:
            log.warning("pairing after an organization connected failed: %s", error)
            return Step(
                "organization",
                f"The Calendly organization is connected ({ref}); pairing deferred (the daily "
                f"check pairs later): {error}.",
            )
        return Step(
            "organization",
            f"The Calendly organization is connected ({ref}); {len(paired)} waiting Close "
            "user(s) were paired.",
            paired=len(paired),
        )

    # -- clients and revocation ----------------------------------------------------------------

    def _budget(self) -> WaitBudget:
        return WaitBudget(self.settings.inline_wait_budget_seconds)

    def _close_client(self, grant: Grant) -> CloseClient:
        token = grant.access_token.get_secret_value()
        http = self.services.api_http("Close", self.settings.close_api_url, self._budget())
        return CloseClient(http=http, token=lambda: token)

    def _calendly_client(self, grant: Grant) -> CalendlyClient:
        token = grant.access_token.get_secret_value()
        http = self.services.api_http("Calendly", self.settings.calendly_api_url, self._budget())
        return CalendlyClient(http=http, token=lambda: token)

    def _revoke_pending(self, flow: PendingFlow) -> None:
        """Revoke the Close grant a failed Calendly step was carrying: it is never stored."""
        if flow.close is not None and "grant" in flow.close:
            self._revoke("close", Grant.model_validate(flow.close["grant"]))

    def _revoke(self, provider: Side, grant: Grant) -> None:
        revoke_grant(self.services, provider, grant)
