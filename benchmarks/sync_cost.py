"""What a sync costs: API calls, seconds and memory for fleets of several sizes.

Runs the engine inline against the sandbox (loopback HTTP) and a real Redis (REDIS_URL, else an
embedded one in a temporary directory), for a first run (everything created) and a second run
(nothing changed). Prints one table; numbers, not assertions. `make bench` runs it.
"""

from __future__ import annotations

import os
import tempfile
import time
import tracemalloc
import uuid

from tests.sync_harness import Harness

from closesync.sandbox import Sandbox, SandboxConfig
from closesync.store.embedded import embedded

SIZES = [(1, 10), (1, 250), (10, 20), (50, 10), (200, 5)]


def measure(redis_url: str, users: int, types: int) -> list[str]:
    sandbox = Sandbox.start(SandboxConfig(seed=3, users=users, event_types=0, freeze_clock=True))
    try:
        for user in sandbox.users:
            for i in range(types):
                sandbox.world.create_event_type(user.calendly_user_uuid, name=f"Type {i:04}")
        harness = Harness.build(sandbox, redis_url, f"bench-{uuid.uuid4().hex[:8]}")
        conns = [harness.add(user) for user in sandbox.users]
        rows = []
        for label in ("first run", "unchanged"):
            sandbox.world.reset_request_counts()
            tracemalloc.start()
            started = time.perf_counter()
            engine = harness.engine()
            for conn in conns:
                engine.run(conn)
            seconds = time.perf_counter() - started
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            counts = sandbox.world.request_counts()
            calendly = sum(v for k, v in counts.items() if k.startswith("calendly"))
            close = sum(v for k, v in counts.items() if k.startswith("close"))
            rows.append(
                f"{users:>5} {types:>6} {label:>10} {calendly:>9} {close:>6} "
                f"{seconds:>8.2f} {seconds / users * 1000:>9.1f} {peak / 1e6:>8.1f}"
            )
        return rows
    finally:
        sandbox.stop()


def main() -> None:
    url = os.environ.get("REDIS_URL") or embedded(tempfile.mkdtemp(prefix="closesync-bench-"))
    print(
        f"{'users':>5} {'types':>6} {'run':>10} {'calendly':>9} {'close':>6} "
        f"{'seconds':>8} {'ms/conn':>9} {'peak MB':>8}"
    )
    for users, types in SIZES:
        for row in measure(url, users, types):
            print(row)


if __name__ == "__main__":
    main()
