"""Connecting by tokens someone already has: `closesync connections add` and `connections import`.

Both users are resolved with the given tokens (Close `GET /me/`, Calendly `GET /users/me`), which
also proves both tokens work; nothing is stored unless both answered, the Close organization may
connect (CLOSE_ORGANIZATION_IDS) and no other connection has that Calendly user (PairingRefused,
from the store). A Close user who already has a connection gets it updated, under its refresh
locks, and the grants it replaces are revoked (`closesync.connect.saving`). `add` makes one
connection with `connect_by_tokens`; `import` makes many with `connect_many`, the same steps in
two phases: every line's users resolved concurrently, then the lines saved, concurrently where
they share no Close or Calendly user, in file order where they do, so that the outcome is the one
of adding them one by one. Nothing here prints or logs a token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import requests
from pydantic import SecretStr

from closesync.apis.calendly.client import CalendlyClient
from closesync.apis.close.client import CloseClient
from closesync.apis.http import new_session
from closesync.connect.deps import ConnectServices
from closesync.connect.saving import save_connection
from closesync.core.calendly_payloads import User
from closesync.core.close_payloads import Me
from closesync.core.connection import Connection, Grant, Grants, connection_between
from closesync.core.errors import ApiError, AuthFailed, CloseSyncError, ConfigError, Forbidden
from closesync.core.retry import WaitBudget
from closesync.core.token_set import (
    TOKEN_FIELDS,
    TokenLine,
    TokenSet,
    independent_groups,
    token_shape_problem,
)


@dataclass(frozen=True)
class Resolved:
    """The two users behind a token set, checked: what saving it needs."""

    tokens: TokenSet
    me: Me
    user: User


@dataclass(frozen=True)
class Added:
    """A connection stored (created, or `updated` when its Close user had one)."""

    connection: Connection
    updated: bool
    close_user: str
    calendly_user: str


class Sessions:
    """One HTTP session per API and thread: a pool thread resolving line after line reuses its
    connections (keep-alive, TLS) instead of opening two per line. requests.Session is not safe
    to share between threads, hence one per thread."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._opened: list[requests.Session] = []
        self._lock = threading.Lock()

    def get(self, api: str) -> requests.Session:
        mine: dict[str, requests.Session] = self._local.__dict__.setdefault("sessions", {})
        if api not in mine:
            mine[api] = new_session()
            with self._lock:
                self._opened.append(mine[api])
        return mine[api]

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
        for session in opened:
            session.close()


def resolve(
    services: ConnectServices,
    tokens: TokenSet,
    *,
    sources: Mapping[str, str] | None = None,
    sessions: Sessions | None = None,
) -> Resolved:
    """Both users behind `tokens`, and the checks that need no store: a token that cannot be
    one, a token either API refuses, a Close organization this closesync does not serve
    (ConfigError, naming where the token came from, `sources`, never its value); an API that
    could not answer (ApiError)."""
    for field in TOKEN_FIELDS:
        value = tokens.token(field)
        problem = None if value is None else token_shape_problem(value)
        if problem is not None:
            raise ConfigError(f"{(sources or {}).get(field, field)} is not a token: {problem}")
    settings = services.settings
    budget = WaitBudget(settings.inline_wait_budget_seconds)
    close_token = tokens.close_access_token.get_secret_value()
    calendly_token = tokens.calendly_token.get_secret_value()
    close = CloseClient(
        http=services.api_http(
            "Close", settings.close_api_url, budget, session=_session(sessions, "Close")
        ),
        token=lambda: close_token,
    )
    calendly = CalendlyClient(
        http=services.api_http(
            "Calendly", settings.calendly_api_url, budget, session=_session(sessions, "Calendly")
        ),
        token=lambda: calendly_token,
    )
    try:
        try:
            me = close.get_me()
        except (AuthFailed, Forbidden) as error:
            raise ConfigError(f"the Close access token was refused: {error}") from None
        try:
            user = calendly.get_current_user()
        except (AuthFailed, Forbidden) as error:
            raise ConfigError(f"the Calendly token was refused: {error}") from None
    except ApiError as error:
        raise ApiError(
            f"could not check the tokens: {error}",
            api=error.api,
            method=error.method,
            endpoint=error.endpoint,
            status=error.status,
        ) from None
    if me.organization_id is None and len(me.organizations) > 1:
        # Only Close's token response names a token's organization, and `add` has none: a guess
        # (the first listed, the only allowed one) could label a token of another organization.
        raise ConfigError(
            f"the Close user belongs to {len(me.organizations)} Close organizations and an access "
            "token alone does not say which one it is for; connect this user with `closesync "
            "connect` or `closesync web`, which learn it from Close; nothing was stored"
        )
    if not settings.close_organization_allowed(me.organization_id):
        raise ConfigError(
            f"the Close user's organization {me.organization_id} is not one this closesync "
            "serves (CLOSE_ORGANIZATION_IDS); nothing was stored"
        )
    return Resolved(tokens, me, user)


def _session(sessions: Sessions | None, api: str) -> requests.Session | None:
    return None if sessions is None else sessions.get(api)


def save(services: ConnectServices, resolved: Resolved, *, now: float | None = None) -> Added:
    """Store the connection of resolved users: created, or its Close user's one updated (under
    its refresh locks, the replaced grants revoked). PairingRefused, nothing stored, when another
    connection has the Calendly user."""
    at = time.time() if now is None else now
    tokens, me, user = resolved.tokens, resolved.me, resolved.user
    calendly_refresh = tokens.token("calendly_refresh_token")
    grants = Grants(
        close=Grant(
            kind="oauth",
            access_token=tokens.close_access_token,
            refresh_token=_secret(tokens.token("close_refresh_token")),
            expires_at=at + tokens.close_expires_in if tokens.close_expires_in else None,
        ),
        calendly=Grant(
            kind="oauth" if calendly_refresh else "pat",
            access_token=tokens.calendly_token,
            refresh_token=_secret(calendly_refresh),
            expires_at=at + tokens.calendly_expires_in if tokens.calendly_expires_in else None,
        ),
    )
    existing: Connection | None = services.connections.find_by_close_user(me.id)
    connection = connection_between(existing, me, user, name=tokens.name, now=at)
    save_connection(services, existing, connection, grants)
    return Added(connection, existing is not None, me.email or me.id, user.email or user.uri)


def _secret(value: str | None) -> SecretStr | None:
    return SecretStr(value) if value else None


def connect_by_tokens(
    services: ConnectServices, tokens: TokenSet, *, sources: Mapping[str, str] | None = None
) -> Added:
    """`connections add`: resolve, check and store one connection."""
    return save(services, resolve(services, tokens, sources=sources))


# What one line came to: the connection stored, or why not (the error names its cause).
Outcome = Added | CloseSyncError
T = TypeVar("T")


def connect_many(
    services: ConnectServices,
    lines: Sequence[TokenLine],
    *,
    concurrency: int,
    on_result: Callable[[TokenLine, Outcome], None],
) -> None:
    """`connections import`: each line as `connect_by_tokens` would, `concurrency` at a time.

    `on_result` is called once per line, from the calling thread, in file order (a line's
    result waits for the lines before it). A line's failure is that line's: the others go on.
    """
    with _pool(concurrency) as (pool, sessions):

        def resolve_line(line: TokenLine) -> tuple[Resolved | CloseSyncError, list[str]]:
            found = _attempt(lambda: resolve(services, line.tokens, sessions=sessions))
            return found, [] if isinstance(found, CloseSyncError) else _keys(services, found)

        resolved = list(pool.map(resolve_line, lines))
        outcomes: list[Outcome | None] = [
            found if isinstance(found, CloseSyncError) else None for found, _ in resolved
        ]
        ready = threading.Condition()

        def save_group(group: list[int]) -> None:
            for index in group:
                found = resolved[index][0]
                if isinstance(found, Resolved):
                    outcome = _attempt(partial(save, services, found))
                    with ready:
                        outcomes[index] = outcome
                        ready.notify_all()

        def woken(_: Future[None]) -> None:
            with ready:
                ready.notify_all()

        saving = [
            pool.submit(save_group, group)
            for group in independent_groups([keys for _, keys in resolved])
        ]
        for future in saving:
            future.add_done_callback(woken)

        def settled(index: int) -> bool:
            return outcomes[index] is not None or all(future.done() for future in saving)

        for index, line in enumerate(lines):
            with ready:
                ready.wait_for(partial(settled, index))
                outcome = outcomes[index]
            if outcome is None:  # a save ended by something that is not a closesync error
                for future in saving:
                    future.result()
                raise RuntimeError(f"line {line.number} was never saved")
            on_result(line, outcome)


def _attempt(step: Callable[[], T]) -> T | CloseSyncError:
    """The step's result, or the error that ended it (every closesync error names its cause)."""
    try:
        return step()
    except CloseSyncError as error:
        return error


def _keys(services: ConnectServices, found: Resolved) -> list[str]:
    """What a line must not be saved concurrently with: its Close user, its Calendly user, and
    the Calendly user its Close user's connection has now (which saving this line frees)."""
    keys = [f"close:{found.me.id}", f"calendly:{_uuid(found.user.uri)}"]
    existing = services.connections.find_by_close_user(found.me.id)
    if existing is not None:
        keys.append(f"calendly:{existing.calendly_user_uuid}")
    return keys


def _uuid(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


@contextmanager
def _pool(concurrency: int) -> Iterator[tuple[ThreadPoolExecutor, Sessions]]:
    sessions = Sessions()
    try:
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="import") as pool:
            yield pool, sessions
    finally:
        sessions.close()
