"""The `closesync sandbox` command: run both emulators until interrupted.

Prints the four base URLs, the sandbox OAuth app credentials (the Calendly app's webhook
signing key among them), the webhook endpoints and their admin controls, and a ready-made token
block per seeded user (or one JSON object with --json), plus `export` lines that point
closesync at the sandbox. A taken port is one clear line on stderr and exit 2 (bad usage or
configuration).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from dataclasses import asdict
from types import FrameType
from typing import Any

from closesync.sandbox.config import (
    CALENDLY_CLIENT_ID,
    CALENDLY_CLIENT_SECRET,
    CALENDLY_WEBHOOK_SIGNING_KEY,
    CLOSE_CLIENT_ID,
    CLOSE_CLIENT_SECRET,
    SandboxConfig,
)
from closesync.sandbox.server import PortInUseError, Sandbox

# The Calendly webhook endpoints and their admin controls (webhooks_api.py, deliveries.py).
_WEBHOOK_PATHS = (
    "/webhook_subscriptions",
    "/_sandbox/webhooks/subscriptions",
    "/_sandbox/webhooks/subscriptions/{uuid}/disable",
    "/_sandbox/webhooks/deliveries",
    "/_sandbox/webhooks/idle?wait=SECONDS",
    "/_sandbox/webhooks/knobs",
)
EXIT_OK = 0
EXIT_USAGE = 2


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the `sandbox` subcommand."""
    parser = subparsers.add_parser(
        "sandbox", help="run local emulators of the Calendly and Close APIs"
    )
    parser.add_argument("--calendly-port", type=int, default=8701, help="0 picks a free port")
    parser.add_argument("--close-port", type=int, default=8702, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--users", type=int, default=3)
    parser.add_argument("--event-types", type=int, default=5, help="per user")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--error-rate", type=float, default=0.0, help="fraction 0..1")
    parser.add_argument("--close-rate-limit", type=int, default=100)
    parser.add_argument("--calendly-rate-limit", type=int, default=500)
    parser.add_argument(
        "--webhook-signing-key",
        default=CALENDLY_WEBHOOK_SIGNING_KEY,
        help="the Calendly OAuth app's webhook signing key (a fixed dev value by default)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def describe(sandbox: Sandbox) -> dict[str, Any]:
    """What the command prints, as data."""
    return {
        "urls": sandbox.env(),
        "admin": [f"{sandbox.calendly_api_url}/_sandbox/", f"{sandbox.world.close_base}/_sandbox/"],
        "oauth_apps": {
            "CLOSE_CLIENT_ID": CLOSE_CLIENT_ID,
            "CLOSE_CLIENT_SECRET": CLOSE_CLIENT_SECRET,
            "CALENDLY_CLIENT_ID": CALENDLY_CLIENT_ID,
            "CALENDLY_CLIENT_SECRET": CALENDLY_CLIENT_SECRET,
            "CALENDLY_WEBHOOK_SIGNING_KEY": sandbox.world.config.calendly_webhook_signing_key,
        },
        "webhooks": [f"{sandbox.calendly_api_url}{path}" for path in _WEBHOOK_PATHS],
        "users": [asdict(user) for user in sandbox.users],
    }


def _text(info: dict[str, Any]) -> str:
    lines = ["closesync sandbox is running (Ctrl-C to stop)", ""]
    lines += [f"  {name:18} {url}" for name, url in info["urls"].items()]
    lines += [f"  {'admin':18} {url}" for url in info["admin"]]
    lines += ["", "Webhooks (event_type.* deliveries of admin changes, signed):"]
    lines += [f"  {url}" for url in info["webhooks"]]
    lines += ["", "OAuth apps:"]
    lines += [f"  {name:24} {value}" for name, value in info["oauth_apps"].items()]
    for user in info["users"]:
        lines += ["", f"{user['name']} <{user['email']}>"]
        for key in (
            "calendly_user_uri",
            "calendly_token",
            "close_user_id",
            "close_access_token",
            "close_refresh_token",
            "close_api_key",
        ):
            lines.append(f"  {key:20} {user[key]}")
    lines += ["", "Point closesync at the sandbox:"]
    lines += [f"  export {name}={url}" for name, url in info["urls"].items()]
    for name, value in info["oauth_apps"].items():
        lines.append(f"  export {name}={value}")
    # Tokens are stored only under a key (never inferred from loopback URLs): a fresh one per
    # shell, which the sandbox itself never sees nor prints.
    lines.append("  export CLOSESYNC_ENCRYPTION_KEYS=$(closesync keys generate)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Start the sandbox, print how to use it and serve until SIGINT/SIGTERM."""
    config = SandboxConfig(
        seed=args.seed,
        users=args.users,
        event_types=args.event_types,
        calendly_port=args.calendly_port,
        close_port=args.close_port,
        host=args.host,
        latency_ms=args.latency_ms,
        error_rate=args.error_rate,
        close_rate_limit=args.close_rate_limit,
        calendly_rate_limit=args.calendly_rate_limit,
        log_requests=not args.json,
        calendly_webhook_signing_key=args.webhook_signing_key,
    )
    try:
        sandbox = Sandbox.start(config)
    except PortInUseError as exc:
        print(
            f"closesync sandbox: port {exc.port} on {exc.host} is already in use", file=sys.stderr
        )
        return EXIT_USAGE
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        info = describe(sandbox)
        print(json.dumps(info, indent=2) if args.json else _text(info), flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        sandbox.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK
