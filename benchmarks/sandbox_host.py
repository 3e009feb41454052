"""The fleet benchmark's sandbox, alone in a process of its own.

Why a process of its own: the benchmark must show that the sandbox is not what limits a figure,
and a process's CPU time (/proc/<pid>/stat) is the one count that includes every handler thread,
even those that ended with their keep-alive connection. In the benchmark's own process the
sandbox would also share a GIL with the report poller.

`python -m benchmarks.sandbox_host --users N --event-types 6 --latency-ms 100 --out FILE`
seeds N user pairs with N x 6 plain active event types, writes the URLs and every user's tokens
to FILE (mode 0600, for the parent; never printed), prints one line `ready` and serves on
127.0.0.1 until its stdin closes or it gets SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from types import FrameType

from closesync.sandbox import Sandbox, SandboxConfig

# Durations cycled over a user's event types: the mapping sends them to Close as they are.
_DURATIONS = (15, 30, 45, 60, 30, 90)


def seed(sandbox: Sandbox, types_per_user: int) -> None:
    """Plain active one-on-one types: each is one link in Close, nothing is filtered out."""
    for user in sandbox.users:
        for i in range(types_per_user):
            sandbox.world.create_event_type(
                user.calendly_user_uuid,
                name=f"Meeting {i + 1}",
                slug=f"meeting-{i + 1}",
                description=f"A {_DURATIONS[i % len(_DURATIONS)]}-minute meeting.",
                duration=_DURATIONS[i % len(_DURATIONS)],
            )


def describe(sandbox: Sandbox) -> dict[str, object]:
    return {
        "calendly_api_url": sandbox.calendly_api_url,
        "calendly_auth_url": sandbox.calendly_auth_url,
        "close_api_url": sandbox.close_api_url,
        "close_oauth_url": sandbox.close_oauth_url,
        "users": [asdict(user) for user in sandbox.users],
    }


def _stop_at_eof(stop: threading.Event) -> None:
    """The parent holds our stdin open; EOF means it is gone, so we never outlive it."""
    sys.stdin.read()
    stop.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--event-types", type=int, default=6)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--close-rate-limit", type=int, default=None, help="Close requests per group-second"
    )
    args = parser.parse_args(argv)
    # Wall-clock time (not frozen): Close's rate windows are one second long and must roll over.
    config = SandboxConfig(seed=11, users=args.users, event_types=0, latency_ms=args.latency_ms)
    if args.close_rate_limit is not None:
        config = dataclasses.replace(config, close_rate_limit=args.close_rate_limit)
    sandbox = Sandbox.start(config)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        seed(sandbox, args.event_types)
        partial = args.out.with_suffix(".partial")
        with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(describe(sandbox), f)
        partial.replace(args.out)
        print("ready", flush=True)
        threading.Thread(target=_stop_at_eof, args=(stop,), daemon=True).start()
        stop.wait()
    finally:
        sandbox.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
