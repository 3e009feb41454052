"""What every route of the web app shares: the process's Services and the connect flows.

One `WebContext` per app (so per gunicorn worker process, built after the fork), kept in
`app.extensions`; a route reaches it with `current()`. Routes build `pages.Response`s, which
`reply` turns into Flask's, so the pages stay usable without Flask (`closesync connect`).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from flask import Flask, current_app
from flask import Response as FlaskResponse

from closesync.connect.connector import Connector
from closesync.web.pages import Response
from closesync.web.webhooks import SyncAsker, WebhookReceiver
from closesync.wiring.services import Services

_EXTENSION = "closesync"


@dataclass(frozen=True)
class WebContext:
    """The app's share of the process: holds no per-user state (that is all in Redis)."""

    services: Services
    connector: Connector
    # The flow cookie is Secure when users reach the app over https (PUBLIC_BASE_URL).
    secure_cookie: bool
    # Takes Calendly's webhook deliveries; None when the app was built without a way to
    # enqueue (then the webhook route answers 503).
    receiver: WebhookReceiver | None = None

    @classmethod
    def build(cls, services: Services, base_url: str, ask: SyncAsker | None = None) -> WebContext:
        return cls(
            services=services,
            connector=Connector(services, base_url),
            secure_cookie=urlsplit(base_url).scheme == "https",
            receiver=WebhookReceiver(services, ask) if ask is not None else None,
        )

    def install(self, app: Flask) -> None:
        app.extensions[_EXTENSION] = self


def current() -> WebContext:
    """The context of the app serving the current request."""
    context: WebContext = current_app.extensions[_EXTENSION]
    return context


def reply(response: Response) -> FlaskResponse:
    """`response` as Flask's."""
    return FlaskResponse(response.body, status=response.status, headers=response.headers)
