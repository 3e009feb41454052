"""`closesync web`: serve the connect pages and OAuth callbacks (Procfile `web`).

gunicorn by default (`web/production.py`): WEB_WORKERS processes (`--workers`) of WEB_THREADS
threads (`--threads`). `--dev` serves the same app from one process on werkzeug's threaded
server (`web/serving.py`), for a developer's machine. Flask and gunicorn are imported only
when the command runs, so that `closesync --help` and every other command start without them.

Before anything is served the settings are checked, the Redis URL is resolved once (the
embedded Redis, when REDIS_URL is unset, is started here and owned by this process), Redis must
answer and tokens must be storable (CLOSESYNC_ENCRYPTION_KEYS): a worker never starts into a
configuration that fails on the first user. No connection made for those checks outlives them,
so none is shared with a forked worker. Logging goes through `closesync.logs.configure` (JSON
lines, context and token redaction) and Sentry starts when SENTRY_DSN is set, in each worker as
in every long-running process (`cli/daemon.py`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any
from urllib.parse import urlsplit

from closesync.settings import Settings, load_settings
from closesync.web.webhooks import SyncAsker
from closesync.wiring.services import Services, redis_url_of

# Port when neither --port, PORT (set by Heroku-like platforms) nor PUBLIC_BASE_URL gives one.
DEFAULT_PORT = 8700


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "web",
        help="serve /connect, the OAuth callbacks, the Calendly webhook receiver and /metrics",
    )
    parser.add_argument(
        "--host", help="interface (default 0.0.0.0 when PORT is set, else loopback)"
    )
    parser.add_argument("--port", type=int, help="port (default PORT, else PUBLIC_BASE_URL's)")
    parser.add_argument(
        "--workers", type=_at_least_one, help="gunicorn worker processes (default WEB_WORKERS)"
    )
    parser.add_argument(
        "--threads", type=_at_least_one, help="threads per worker (default WEB_THREADS)"
    )
    parser.add_argument(
        "--dev",
        action="store_true",
        help="one process on werkzeug's server instead of gunicorn (development only)",
    )
    parser.set_defaults(func=cmd_web)


def _address(args: argparse.Namespace, settings: Settings) -> tuple[str, int]:
    platform_port = os.environ.get("PORT")
    port = args.port if args.port is not None else (int(platform_port) if platform_port else None)
    if port is None:
        port = urlsplit(settings.public_base_url).port or DEFAULT_PORT
    host = args.host or ("0.0.0.0" if platform_port else "127.0.0.1")
    return host, port


def cmd_web(args: argparse.Namespace) -> int:
    from closesync.wiring.logs import configure

    settings = load_settings()
    if not args.dev:
        # First: the exec below must come before anything starts (an embedded Redis included).
        _multiprocess_metrics(settings)
    configure(settings.log_level, settings.log_format)
    _export_sync_intervals(settings)
    # Resolved once, here: each worker must reach this Redis, not start an embedded one.
    settings = settings.model_copy(update={"redis_url": redis_url_of(settings)})
    checked = Services.build(settings)
    try:
        checked.require_key()  # the flows store tokens: refuse to start rather than fail then
    finally:
        checked.close()
        checked.redis.close()
    host, port = _address(args, settings)
    if args.dev:
        return _serve_dev(settings, host, port)
    from closesync.web.production import Serving, serve

    serve(
        settings,
        Serving(
            host=host,
            port=port,
            workers=args.workers or settings.web_workers,
            threads=args.threads or settings.web_threads,
        ),
        webhook_asker_of,
    )
    return 0


def _multiprocess_metrics(settings: Settings) -> None:
    """gunicorn's workers are processes and a scrape of /metrics reaches one of them: count in
    prometheus_client's multiprocess mode, in a directory of the web process's own, re-executing
    once to get there (`count_in_own_multiproc_dir`), as `closesync worker --pool prefork` does.
    """
    from closesync.wiring.metrics import count_in_own_multiproc_dir

    count_in_own_multiproc_dir(settings, "web")


def webhook_asker_of(services: Services) -> SyncAsker:
    """What webhook deliveries ask for syncs with, on a Celery app of this process's own."""
    from closesync.worker.celery_app import create_app
    from closesync.worker.webhook_asks import webhook_asker

    return webhook_asker(services, create_app(services.settings))


def _serve_dev(settings: Settings, host: str, port: int) -> int:
    from closesync.web.serving import WebServer
    from closesync.wiring.observability import init_sentry

    init_sentry(settings)
    services = Services.build(settings)
    server = WebServer(
        (host, port), services, settings.public_base_url, ask=webhook_asker_of(services)
    )
    bound = server.server_address[1]  # the port taken, when asked for 0
    sys.stderr.write(
        f"closesync web on {host}:{bound}; users connect at {settings.public_base_url}/connect "
        "(development server, one process)\n"
    )
    sys.stderr.flush()
    try:
        server.serve_forever()
    finally:
        server.server_close()
        services.close()
    return 0


def _export_sync_intervals(settings: Settings) -> None:
    """The web's fleet gauges export the sync interval per cadence, as the scheduler's do."""
    from closesync.cli.daemon import sync_intervals
    from closesync.wiring.metrics import use_sync_intervals

    use_sync_intervals(lambda: sync_intervals(settings))
