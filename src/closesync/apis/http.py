"""The one HTTP layer both API clients stand on.

It owns the things every call needs and no client should repeat: connect and read timeouts, the
mapping of a response to the typed errors of `closesync.core.errors` (the only place that does it),
honouring the rate-limit headers of both APIs (read by `closesync.core.ratelimits`), waiting out
rate limits and transient errors within a `WaitBudget`, and counting calls (per run, for the
report, and per process in `closesync.meters`: calls by API, group and status class, 429s and
seconds waited for rate limits). It knows nothing of event types or links.

A `RateBudget` (optional) is the rate budget that every process calling the API for the same
account shares (in Redis: `closesync.store.rate_budget`; wired by `closesync.wiring.services`):
each call takes one request from it first, and a response saying the group has none left (or a
429) blocks every caller of that budget until the reset, not only this one.

What lives how long: `HttpSessions` is per process (one keep-alive `requests.Session` per API,
its connection pool sized to the process's concurrency, shared by every run and closed at
shutdown), so a run reuses open connections instead of paying a TCP and TLS handshake; an
`ApiHttp` is per run (its wait budget, call counters and rate-limit waits belong to that run).

`sleep`, `rand` and `clock` are injected so tests run with a fake clock instead of patching time.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.cookiejar import DefaultCookiePolicy
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from closesync import __version__, meters
from closesync.core.errors import (
    ApiError,
    AuthFailed,
    BadResponse,
    Conflict,
    Forbidden,
    NotFound,
    RateLimited,
    Rejected,
    RetryableError,
    TransientError,
)
from closesync.core.ratelimits import rate_limit_of, wait_from_429
from closesync.core.retry import Random, WaitBudget, rate_limit_delay, transient_delay

# Connect fast or not at all; a listing page of 100 event types can take a few seconds to build.
DEFAULT_TIMEOUT = (5.0, 30.0)
# Attempts per call when the budget still allows waiting (first try included).
DEFAULT_MAX_ATTEMPTS = 5


class RateBudget(Protocol):
    """A rate budget shared by every caller of one API account (a Close organization, a Calendly
    user); `group` is the call's rate-limit group (`METHOD /endpoint/template/`)."""

    def take(self, group: str) -> float:
        """Spend one request of `group` and return 0, or return the seconds (> 0) until one may be
        spent, spending nothing."""
        ...

    def block(self, group: str, seconds: float) -> None:
        """The API said `group` has no requests left for `seconds`: nobody spends any until then."""
        ...


def _decode_json(body: bytes) -> Any:
    """The JSON value of a body, or raise ValueError."""
    return json.loads(body.decode("utf-8"))


def _describe_body(body: bytes, content_type: str) -> tuple[str, Any]:
    """A short description of a body for error messages, and its JSON value when it has one."""
    if not body.strip():
        return "an empty body", None
    try:
        value = _decode_json(body)
    except (ValueError, UnicodeDecodeError):
        if "html" in content_type.lower() or body.lstrip()[:1] == b"<":
            return "an HTML page instead of JSON", None
        if "json" in content_type.lower():
            return "a truncated or invalid JSON body", None
        return "a non-JSON body", None
    return "", value


def _error_text(value: Any) -> str:
    """The human part of an error body of either API, shortened."""
    if not isinstance(value, dict):
        return ""
    parts: list[str] = []
    for key in ("title", "message", "error", "error_description"):
        text = value.get(key)
        if isinstance(text, str) and text:
            parts.append(text)
    errors = value.get("errors")
    if isinstance(errors, list):
        parts.extend(str(e) for e in errors if e)
    return "; ".join(parts)[:300]


def field_errors_of(value: Any) -> dict[str, str]:
    """Close's `field-errors` or Calendly's `details` as {field: message}."""
    result: dict[str, str] = {}
    if not isinstance(value, dict):
        return result
    close_fields = value.get("field-errors")
    if isinstance(close_fields, dict):
        for name, message in close_fields.items():
            result[str(name)] = str(message)
    details = value.get("details")
    if isinstance(details, list):
        for item in details:
            if isinstance(item, dict):
                name = str(item.get("parameter") or "request")
                result[name] = str(item.get("message") or "")
    return result


def raise_for_response(
    api: str,
    method: str,
    endpoint: str,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
) -> Any:
    """Return the JSON value of a successful response, or raise the error class it calls for.

    The single place where a status, headers and body become a typed error. A 204 or an empty
    2xx body where none is expected returns None; the caller checks the shape.
    """
    where = f"{api} {method} {endpoint}"
    content_type = headers.get("Content-Type", "")
    description, value = _describe_body(body, content_type)
    kwargs: dict[str, Any] = {"api": api, "method": method, "endpoint": endpoint, "status": status}
    if 200 <= status < 300:
        if status == 204 or not body.strip():
            return None
        if description:
            raise BadResponse(f"{where} answered {status} with {description}", **kwargs)
        return value
    detail = f" with {description}" if description else ""
    text = _error_text(value)
    said = f": {text}" if text else ""
    message = f"{where} answered {status}{detail}{said}"
    if status == 429:
        wait = wait_from_429(api, headers)
        raise RateLimited(f"{message} (wait {wait:g} s)", wait_seconds=wait, **kwargs)
    if status == 401:
        raise AuthFailed(message, **kwargs)
    if status == 403:
        raise Forbidden(message, **kwargs)
    if status == 404:
        # Only an error body of the API's own (a JSON object naming the error) is its word.
        raise NotFound(message, from_api=bool(text), **kwargs)
    if status == 409:
        raise Conflict(message, field_errors=field_errors_of(value), **kwargs)
    if status in (400, 422):
        raise Rejected(message, field_errors=field_errors_of(value), **kwargs)
    if status >= 500 or status == 408:
        raise TransientError(message, **kwargs)
    raise ApiError(message, **kwargs)


# Connections kept open per host by a session made without a size (a test, a one-off client).
DEFAULT_POOL_SIZE = 10
# Host pools a session keeps: an API's base host and its OAuth host, with room to spare.
HOST_POOLS = 4


class _Session(requests.Session):
    """A requests session that reads the proxy and CA-bundle environment once per host.

    requests looks at the whole environment on every request (HTTPS_PROXY, NO_PROXY matched
    against the host, REQUESTS_CA_BUNDLE): a tenth of a steady run's CPU. The environment of a
    process does not change under it, and an API's calls all go to one or two hosts, so what it
    says for a host is kept for the session's life. A call passing its own proxies, stream,
    verify or cert is merged afresh, as requests would.
    """

    def __init__(self) -> None:
        super().__init__()
        self._environment: dict[tuple[str, str], Any] = {}

    def merge_environment_settings(
        self,
        url: str | bytes | None,
        proxies: Any,
        stream: bool | None,
        verify: Any,
        cert: Any,
    ) -> Any:
        if proxies or stream is not None or verify is not None or cert is not None:
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        text = url.decode() if isinstance(url, bytes) else url or ""
        parts = urlsplit(text)
        host = (parts.scheme, parts.netloc)
        settings = self._environment.get(host)
        if settings is None:
            settings = super().merge_environment_settings(url, {}, None, None, None)
            self._environment[host] = settings
        # A copy: requests may add to what it is handed.
        return {**settings, "proxies": dict(settings["proxies"])}


def new_session(pool_size: int = DEFAULT_POOL_SIZE) -> requests.Session:
    """A keep-alive session with closesync's User-Agent, keeping up to `pool_size` connections
    open per host, that stores no cookies, and reads the proxy environment once per host.

    Shared by the runs of every connection, a cookie one user's answer set (a load balancer's,
    say) would ride along on the next user's calls: nothing of one run may reach another.
    """
    session = _Session()
    session.headers["User-Agent"] = f"closesync/{__version__}"
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    _mount_pool(session, pool_size)
    return session


def _mount_pool(session: requests.Session, pool_size: int) -> None:
    # Not blocking: a burst above the size opens extra connections (closed after use) rather
    # than waiting for a free one.
    adapter = HTTPAdapter(pool_connections=HOST_POOLS, pool_maxsize=max(1, pool_size))
    session.mount("https://", adapter)
    session.mount("http://", adapter)


class HttpSessions:
    """The process's HTTP sessions: one per API, made on first use, shared by every run.

    Thread-safe: requests' sessions keep no per-call state once built (no cookies
    here), urllib3's connection pools are locked, and making a session is done under a lock.
    `pool_size` should be the number of runs the process makes at once, so that each keeps its
    connection open between calls.
    """

    def __init__(self, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        self.pool_size = max(1, pool_size)
        self._sessions: dict[str, requests.Session] = {}
        self._lock = threading.Lock()

    def get(self, api: str) -> requests.Session:
        """The session of `api` ("Calendly", "Close"), its OAuth endpoints included."""
        with self._lock:
            session = self._sessions.get(api)
            if session is None:
                session = self._sessions[api] = new_session(self.pool_size)
            return session

    def reserve(self, pool_size: int) -> None:
        """Keep at least `pool_size` connections per host from now on (inline `--concurrency`)."""
        with self._lock:
            if pool_size <= self.pool_size:
                return
            self.pool_size = pool_size
            for session in self._sessions.values():
                # The old pools are left to finish what they serve, not closed under them.
                _mount_pool(session, pool_size)

    def close(self) -> None:
        """Close every open connection (at shutdown); a later call opens new ones."""
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.close()


@dataclass
class ApiHttp:
    """Calls one API: timeouts, error mapping, inline waiting within a budget, call counting.

    One instance serves one connection's run (its budget and counters are per run). `group` names
    the rate-limit bucket of a call (Close buckets per endpoint group); when an earlier response
    said a group has no requests left, the next call to it waits for the reset first.
    `rate_budget`, when set, is the account's budget shared with every other process: each
    attempt takes a request from it, waiting within `budget` when it is spent (a wait past
    `budget` raises RateLimited before any request is sent, so the caller retries later).
    """

    api: str
    base_url: str
    session: requests.Session = field(default_factory=new_session)
    timeout: tuple[float, float] = DEFAULT_TIMEOUT
    budget: WaitBudget = field(default_factory=lambda: WaitBudget(60.0))
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    rand: Random = random.random
    calls: int = 0
    calls_by_endpoint: dict[str, int] = field(default_factory=dict)
    rate_budget: RateBudget | None = None
    _blocked_until: dict[str, float] = field(default_factory=dict)

    def request(
        self,
        method: str,
        path: str,
        *,
        endpoint: str | None = None,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        form: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        url: str | None = None,
    ) -> Any:
        """Make one call, retrying what may be retried within the budget; return the JSON body.

        `path` is appended to the base URL unless a full `url` is given (a `next_page` link).
        `endpoint` is the path template used in messages and as the rate-limit group.
        """
        endpoint = endpoint or path
        group = f"{method} {endpoint}"
        attempt = 0
        while True:
            self._wait_for_group(group, method, endpoint)
            self._take_from_budget(group, method, endpoint)
            try:
                return self._once(
                    method,
                    url or self.base_url.rstrip("/") + path,
                    endpoint,
                    group,
                    params=params,
                    json_body=json_body,
                    form=form,
                    headers=headers,
                    auth=auth,
                )
            except RetryableError as error:
                attempt += 1
                if isinstance(error, RateLimited):
                    delay = rate_limit_delay(error.wait_seconds, self.rand)
                else:
                    delay = transient_delay(attempt - 1, self.rand)
                if attempt >= self.max_attempts or not self.budget.allows(delay):
                    raise
                self.budget.spend(delay)
                if isinstance(error, RateLimited):
                    meters.count_rate_limit_wait(self.api, delay)
                self.sleep(delay)

    def _wait_for_group(self, group: str, method: str, endpoint: str) -> None:
        """Honour a reset announced by an earlier response before calling that group again."""
        until = self._blocked_until.get(group)
        if until is None:
            return
        wait = until - self.clock()
        if wait <= 0:
            del self._blocked_until[group]
            return
        if not self.budget.allows(wait):
            raise self._out_of_requests(
                method, endpoint, f" is out of requests for {wait:.2f} s", wait
            )
        self.budget.spend(wait)
        meters.count_rate_limit_wait(self.api, wait)
        self.sleep(wait)
        self._blocked_until.pop(group, None)

    def _out_of_requests(self, method: str, endpoint: str, why: str, wait: float) -> RateLimited:
        """A call not sent because its rate limit leaves no request within the wait budget."""
        return RateLimited(
            f"{self.api} {method} {endpoint}{why}",
            wait_seconds=wait,
            api=self.api,
            method=method,
            endpoint=endpoint,
            status=None,
        )

    def _take_from_budget(self, group: str, method: str, endpoint: str) -> None:
        """Take one request from the shared rate budget, waiting for it within `budget`."""
        if self.rate_budget is None:
            return
        while True:
            wait = self.rate_budget.take(group)
            if wait <= 0:
                return
            # Jitter: the callers that found the budget spent together must not return together.
            delay = rate_limit_delay(wait, self.rand)
            if not self.budget.allows(delay):
                spent = f": the shared rate budget is spent for {wait:.2f} s"
                raise self._out_of_requests(method, endpoint, spent, wait)
            self.budget.spend(delay)
            meters.count_rate_limit_wait(self.api, delay)
            self.sleep(delay)

    def _once(
        self,
        method: str,
        url: str,
        endpoint: str,
        group: str,
        **kwargs: Any,
    ) -> Any:
        self.calls += 1
        self.calls_by_endpoint[group] = self.calls_by_endpoint.get(group, 0) + 1
        try:
            response = self.session.request(
                method,
                url,
                params=kwargs["params"],
                json=kwargs["json_body"],
                data=kwargs["form"],
                headers=kwargs["headers"],
                auth=kwargs["auth"],
                timeout=self.timeout,
                allow_redirects=False,
            )
            body = response.content
        except (requests.RequestException, UnicodeError) as exc:
            meters.count_api_call(self.api, group, None)
            raise self._transport_error(exc, method, endpoint) from None
        meters.count_api_call(self.api, group, response.status_code)
        info = rate_limit_of(self.api, response.headers)
        if info is not None and info.remaining == 0 and info.reset_seconds:
            self._blocked_until[group] = self.clock() + info.reset_seconds
        if self.rate_budget is not None:
            # What this response taught about the group holds for every process of the account.
            if response.status_code == 429:
                self.rate_budget.block(group, wait_from_429(self.api, response.headers))
            elif info is not None and info.remaining == 0 and info.reset_seconds:
                self.rate_budget.block(group, info.reset_seconds)
        return raise_for_response(
            self.api, method, endpoint, response.status_code, response.headers, body
        )

    def _transport_error(self, exc: BaseException, method: str, endpoint: str) -> ApiError:
        """The typed error of a call that got no response; never the exception's own text."""
        where = f"{self.api} {method} {endpoint}"
        kwargs: dict[str, Any] = {"api": self.api, "method": method, "endpoint": endpoint}
        if isinstance(exc, UnicodeError):
            # A header value (a token) requests cannot encode; its text holds the value: drop it.
            return AuthFailed(
                f"{where} could not be sent: the credentials contain characters an HTTP header "
                "cannot carry",
                **kwargs,
            )
        if isinstance(exc, requests.Timeout):
            return TransientError(f"{where} timed out ({type(exc).__name__})", **kwargs)
        if isinstance(exc, requests.ConnectionError):
            reason = _transport_reason(exc)
            return TransientError(f"{where} failed: connection error ({reason})", **kwargs)
        return TransientError(f"{where} failed: {type(exc).__name__}", **kwargs)


def _transport_reason(exc: BaseException) -> str:
    """A short cause for a transport failure, without URLs (which may carry query secrets)."""
    text = str(exc)
    for needle, reason in (
        ("reset by peer", "connection reset by peer"),
        ("Connection refused", "connection refused"),
        ("RemoteDisconnected", "remote end closed the connection"),
        ("IncompleteRead", "response ended early"),
        ("Name or service not known", "host name not found"),
    ):
        if needle in text:
            return reason
    return type(exc).__name__
