"""Every error closesync raises, grouped by what the caller must do about it.

    CloseSyncError
    ├── ConfigError                 bad usage or configuration: stop, exit code 2
    ├── StoreUnavailable            Redis cannot be reached or answered an error: stop, retry later
    ├── CorruptState                a value stored in Redis does not parse: stop, report it
    ├── RunLocked                   another run holds this connection's lock: run again after it
    ├── ConnectionNotFound          no connection with that id
    ├── PairingRefused              another connection has that Calendly user: nothing stored
    ├── ConnectionRemoved           the connection is being (or was) removed: its runs write nothing
    ├── RemovalIncomplete           `connections remove` stopped midway: run it again to finish
    ├── DeadlineReached             a worker run's time is up: it stopped between steps; resume it
    ├── EncryptionError             a stored secret cannot be decrypted or no key is set
    └── ApiError                    one call to Calendly or Close failed
        ├── RetryableError          try the same call again later; nothing is lost
        │   ├── RateLimited         429: wait `wait_seconds` (the API's own figure) first
        │   └── TransientError      5xx, timeout, reset connection
        │       └── BadResponse     a 2xx whose body is empty, not JSON, or not the documented shape
        ├── AuthFailed              401: refresh once, then the connection needs re-authorization
        │   └── GrantRevoked        refresh token refused (invalid_grant): needs re-authorization
        ├── Forbidden               403: missing scope or permission; stop this connection
        ├── NotFound                404
        ├── Rejected                400/422: this one record was refused; skip it, keep the others
        │   └── Conflict            409: it exists already (a webhook subscription to that URL)
        └── PaginationError         a listing repeated a page token; the listing is incomplete

Only `closesync.http.raise_for_response` maps an HTTP status and headers to these classes. Every
message names the API, the method, the endpoint and the status or transport error, e.g.
`Calendly GET /event_types answered 502 with a non-JSON body`. Messages never contain a token.
"""

from __future__ import annotations


class CloseSyncError(Exception):
    """Base of every error closesync raises on purpose."""


class ConfigError(CloseSyncError):
    """A setting or argument is missing or invalid."""


class StoreUnavailable(CloseSyncError):
    """Redis could not be reached or failed a command."""


class RunLocked(CloseSyncError):
    """Another process is running this connection right now."""


class CorruptState(CloseSyncError):
    """A value stored in Redis no longer parses (hand-edited, truncated, or from a bad release)."""


class ConnectionNotFound(CloseSyncError):
    """No connection is stored under the given id."""


class PairingRefused(CloseSyncError):
    """The Calendly user is already paired with another Close user, by `connection_id`.

    A `source_id` is `<Calendly user uuid>:<event type uuid>` and Close may scope it per
    application only, so two connections of one Calendly user could overwrite or delete each
    other's links: the second pairing is refused and nothing of it is stored.
    """

    def __init__(self, message: str, *, connection_id: str) -> None:
        super().__init__(message)
        self.connection_id = connection_id


class ConnectionRemoved(CloseSyncError):
    """The connection carries a removal mark: a run stops, and no state of it is written."""


class RemovalIncomplete(CloseSyncError):
    """A removal stopped after it began; the connection stays marked (not synced) until rerun."""


class DeadlineReached(CloseSyncError):
    """A run's deadline passed: it stopped between two steps, everything before them recorded.

    The engine's own stand-in for Celery's soft time limit, which the threads pool does not
    enforce; the task resumes such a run as it resumes one stopped by the soft limit.
    """


class EncryptionError(CloseSyncError):
    """A secret could not be encrypted or decrypted with the configured keys."""


class ApiError(CloseSyncError):
    """A call to Calendly or Close failed; carries where and how."""

    def __init__(
        self,
        message: str,
        *,
        api: str,
        method: str,
        endpoint: str,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.api = api
        self.method = method
        self.endpoint = endpoint
        self.status = status

    @property
    def message(self) -> str:
        return str(self.args[0])


class RetryableError(ApiError):
    """The same call may succeed later."""


class RateLimited(RetryableError):
    """The API asked us to wait `wait_seconds` before calling again."""

    def __init__(self, message: str, *, wait_seconds: float, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.wait_seconds = wait_seconds


class TransientError(RetryableError):
    """5xx, timeout or a dropped connection."""


class BadResponse(TransientError):
    """A success status with a body we cannot use (empty, not JSON, truncated, wrong shape)."""


class AuthFailed(ApiError):
    """The credentials were refused (401)."""


class GrantRevoked(AuthFailed):
    """The refresh token was refused: the user must authorize again."""


class Forbidden(ApiError):
    """The credentials lack a scope or permission (403)."""


class NotFound(ApiError):
    """The resource does not exist (404).

    `from_api`: the body was the API's own JSON error. A 404 without it (an HTML page, an empty
    body) may come from a proxy or load balancer in front of the API, and says nothing of the
    resource: it is no ground for deleting anything.
    """

    def __init__(self, message: str, *, from_api: bool = True, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.from_api = from_api


class Rejected(ApiError):
    """The API refused this one request's data (400/422)."""

    def __init__(self, message: str, *, field_errors: dict[str, str], **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.field_errors = field_errors


class Conflict(Rejected):
    """The API refused a create because the resource exists already (409)."""


class PaginationError(ApiError):
    """A listing repeated a page token, so it can never be known complete."""
