"""What `closesync connections import` costs: seconds for N lines against slow APIs.

Starts the sandbox with N users and `--latency-ms` on every answer (default 1,000 users, 100 ms,
about what the real APIs take from a server), writes one JSON line of token sets per user, and
times `closesync connections import FILE` as its own process at several `--concurrency` values,
each into a fresh key prefix (every line a new connection). For comparison it times
`connections add` run once per line (the way before import), for the first few lines only, and
scales that to N. Redis is REDIS_URL, else an embedded one in a temporary directory. Numbers, not
assertions: `python -m benchmarks.import_cost [--lines N] [--latency-ms MS]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from closesync.sandbox import Sandbox, SandboxConfig
from closesync.store.embedded import embedded
from closesync.store.secretbox import generate_key

CONCURRENCY = [16, 64]
# Lines added one `connections add` process each, to scale the old way's cost to N lines.
ADD_SAMPLE = 10


def run(args: list[str], env: dict[str, str], stdin: str | None = None) -> tuple[float, int]:
    """Seconds a closesync command takes as a process, and its exit code (output thrown away)."""
    started = time.perf_counter()
    done = subprocess.run(  # our own interpreter and module
        [sys.executable, "-m", "closesync", *args],
        env=env,
        input=stdin,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
        timeout=1800,
    )
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-500:])
    return time.perf_counter() - started, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    options = parser.parse_args()
    url = os.environ.get("REDIS_URL") or embedded(tempfile.mkdtemp(prefix="closesync-bench-"))
    sandbox = Sandbox.start(
        SandboxConfig(seed=9, users=options.lines, event_types=0, latency_ms=options.latency_ms)
    )
    try:
        users = sandbox.users
        file = Path(tempfile.mkdtemp(prefix="closesync-import-")) / "floor.jsonl"
        file.write_text(
            "".join(
                json.dumps(
                    {
                        "close_access_token": u.close_access_token,
                        "close_refresh_token": u.close_refresh_token,
                        "calendly_token": u.calendly_token,
                    }
                )
                + "\n"
                for u in users
            )
        )
        base = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "CLOSESYNC_"))},
            **sandbox.env(),
            "REDIS_URL": url,
            "CLOSESYNC_ENCRYPTION_KEYS": generate_key(),
        }
        print(f"{options.lines} lines, {options.latency_ms:g} ms per API answer")
        for concurrency in CONCURRENCY:
            env = {**base, "REDIS_PREFIX": f"bench-import-{uuid.uuid4().hex[:8]}"}
            seconds, code = run(
                ["connections", "import", str(file), "--concurrency", str(concurrency)], env
            )
            print(f"import --concurrency {concurrency:<4} {seconds:8.1f} s  (exit {code})")
        env = {**base, "REDIS_PREFIX": f"bench-add-{uuid.uuid4().hex[:8]}"}
        started = time.perf_counter()
        for user in users[:ADD_SAMPLE]:
            stdin = (
                f"CLOSESYNC_CLOSE_ACCESS_TOKEN={user.close_access_token}\n"
                f"CLOSESYNC_CLOSE_REFRESH_TOKEN={user.close_refresh_token}\n"
                f"CLOSESYNC_CALENDLY_TOKEN={user.calendly_token}\n"
            )
            run(["connections", "add", "--tokens-from-stdin"], env, stdin)
        each = (time.perf_counter() - started) / ADD_SAMPLE
        print(
            f"connections add, one per line: {each:.2f} s a line, "
            f"~{each * options.lines:.0f} s for {options.lines} (from {ADD_SAMPLE})"
        )
    finally:
        sandbox.stop()


if __name__ == "__main__":
    main()
