"""GET /healthz: whether this web process can reach Redis (load balancers, compose healthcheck).

The only route that also answers HEAD: a probe may send either, and it consumes nothing.
"""

from __future__ import annotations

import logging

from flask import Blueprint
from flask import Response as FlaskResponse
from redis.exceptions import RedisError

from closesync.web.context import current, reply
from closesync.web.pages import Response, page

log = logging.getLogger(__name__)

blueprint = Blueprint("health", __name__)


@blueprint.route("/healthz", methods=["GET", "HEAD"])
def healthz() -> FlaskResponse:
    """200 `ok` while Redis answers PING, 503 otherwise (the process itself is fine)."""
    try:
        current().services.redis.ping()
    except RedisError as error:
        log.warning("healthz: Redis does not answer: %s", type(error).__name__)
        return reply(page(503, "Temporarily unavailable", "Redis does not answer."))
    return reply(Response(200, b"ok\n", {"Content-Type": "text/plain"}))
