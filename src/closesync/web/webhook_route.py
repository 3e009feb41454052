"""POST /webhooks/calendly/<key>: Calendly's deliveries, handed to `WebhookReceiver`.

The one POST route. It reads the raw body with `request.get_data()` (the signature is over
those exact bytes; `CappedRequest` refuses a chunked body past the cap with 413) and lets the
framework-free receiver (`closesync.web.webhooks`) answer. A web app built without an asker
(`create_app(..., ask=None)`: a process that cannot enqueue) answers 503, which Calendly
retries, never 410.
"""

from __future__ import annotations

import json

from flask import Blueprint, request
from flask import Response as FlaskResponse

from closesync.core.webhooks import CALLBACK_PATH
from closesync.web.context import current
from closesync.web.webhooks import Reply

blueprint = Blueprint("webhooks", __name__)


def _answer(reply: Reply) -> FlaskResponse:
    return FlaskResponse(json.dumps(reply.body), status=reply.status, headers=reply.headers)


@blueprint.route(CALLBACK_PATH + "<key>", methods=["POST"])
def calendly_delivery(key: str) -> FlaskResponse:
    receiver = current().receiver
    if receiver is None:
        return _answer(Reply(503, {"error": "this process takes no webhook deliveries"}))
    too_large = receiver.too_large(request.content_length)
    if too_large is not None:
        return _answer(too_large)
    body = request.get_data()
    assert isinstance(body, bytes)  # noqa: S101 - get_data() without as_text
    return _answer(receiver.receive(key, dict(request.headers.items()), body))
