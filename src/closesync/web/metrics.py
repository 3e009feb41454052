"""GET /metrics: the web process's Prometheus metrics (`closesync.wiring.metrics.render`).

gunicorn serves the app from several worker processes, and a scrape reaches any one of them:
`closesync web` therefore counts in prometheus_client's multiprocess mode (a directory of its
own, cleaned at start, `cli/web.py`), so every scrape answers the sum over the workers. Keep the
route off the public proxy: it names Close organization ids.
"""

from __future__ import annotations

from flask import Blueprint
from flask import Response as FlaskResponse

from closesync.web.context import current
from closesync.wiring.metrics import render

blueprint = Blueprint("metrics", __name__)


@blueprint.route("/metrics", methods=["GET"])
def metrics() -> FlaskResponse:
    body, content_type = render(current().services)
    return FlaskResponse(body, status=200, content_type=content_type)
