"""`closesync web`: serve the connect pages and OAuth callbacks (Procfile `web`).

Logging goes through `closesync.logs.configure` (JSON lines, context and token redaction) and
Sentry starts when SENTRY_DSN is set, as for every long-running process (`cli/daemon.py`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any
from urllib.parse import urlsplit

from closesync.settings import load_settings
from closesync.wiring.services import load_services

# Port when neither --port, PORT (set by Heroku-like platforms) nor PUBLIC_BASE_URL gives one.
DEFAULT_PORT = 8700


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser("web", help="serve /connect and the OAuth callbacks")
    parser.add_argument(
        "--host", help="interface (default 0.0.0.0 when PORT is set, else loopback)"
    )
    parser.add_argument("--port", type=int, help="port (default PORT, else PUBLIC_BASE_URL's)")
    parser.set_defaults(func=cmd_web)


def cmd_web(args: argparse.Namespace) -> int:
    from closesync.web.serving import WebServer
    from closesync.wiring.logs import configure
    from closesync.wiring.observability import init_sentry

    settings = load_settings()
    configure(settings.log_level, settings.log_format)
    init_sentry(settings)
    services = load_services(settings)
    services.require_key()  # the connect flows store tokens: refuse to start rather than fail then
    platform_port = os.environ.get("PORT")
    port = args.port or (int(platform_port) if platform_port else None)
    if port is None:
        port = urlsplit(settings.public_base_url).port or DEFAULT_PORT
    host = args.host or ("0.0.0.0" if platform_port else "127.0.0.1")
    server = WebServer((host, port), services, settings.public_base_url)
    bound = server.server_address[1]  # the port taken, when asked for 0
    sys.stderr.write(
        f"closesync web on {host}:{bound}; users connect at {settings.public_base_url}/connect\n"
    )
    sys.stderr.flush()
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
