"""The naive peer the fleet benchmark measures closesync against: what a first script would do.

For each connection, one after another: list the user's Calendly event types (every page),
upsert every one of them to Close's integration endpoint, list the user's Close links (every
page), and delete our links whose event type was not listed. No fingerprints, no state, no
retries beyond waiting out a 429: every pass makes the same calls. It uses no closesync code;
it reads the URLs and tokens the benchmark wrote for it (the sandbox's own tokens).

Sequential it uses one requests.Session. With --threads T the connections are shared among T
threads, each with a Session of its own (a Session is not documented as thread-safe, and one
shared pool of 10 connections would make 16 threads reconnect).

`python -m benchmarks.naive --input FILE [--threads T] [--limit K] [--timeout S]` prints one
JSON object: seconds, connections done, errors, its peak RSS and CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

# Bounds: pages of one listing, attempts of one call after 429s, seconds of one call.
MAX_PAGES = 100
MAX_ATTEMPTS = 5
TIMEOUT = (5.0, 30.0)
_SOURCE_TYPES = {"round_robin": "Round Robin", "collective": "Collective"}


class Peer:
    """One connection at a time over one Session."""

    def __init__(self, calendly_url: str, close_url: str, session: requests.Session) -> None:
        self.calendly_url = calendly_url
        self.close_url = close_url
        self.session = session
        # Proxy variables must not send loopback traffic anywhere else.
        self.session.trust_env = False

    def call(self, method: str, url: str, token: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"}
        for _ in range(MAX_ATTEMPTS):
            response = self.session.request(method, url, headers=headers, timeout=TIMEOUT, **kwargs)
            if response.status_code != 429:
                return response
            time.sleep(float(response.headers.get("Retry-After") or 1))
        return response

    def event_types(self, token: str, user_uri: str) -> Iterator[dict[str, Any]]:
        url: str | None = f"{self.calendly_url}/event_types"
        params: dict[str, Any] | None = {"user": user_uri, "count": 100}
        for _ in range(MAX_PAGES):
            if url is None:
                return
            response = self.call("GET", url, token, params=params)
            response.raise_for_status()
            body = response.json()
            yield from body["collection"]
            url, params = body["pagination"].get("next_page"), None

    def close_links(self, token: str) -> Iterator[dict[str, Any]]:
        for page in range(MAX_PAGES):
            params = {"_skip": page * 100, "_limit": 100}
            response = self.call("GET", f"{self.close_url}/scheduling_link/", token, params=params)
            response.raise_for_status()
            body = response.json()
            yield from body["data"]
            if not body.get("has_more"):
                return

    def sync(self, conn: dict[str, str]) -> None:
        user_uuid = conn["calendly_user_uuid"]
        wanted: set[str] = set()
        for et in self.event_types(conn["calendly_token"], conn["calendly_user_uri"]):
            source_id = f"{user_uuid}:{et['uri'].rsplit('/', 1)[-1]}"
            wanted.add(source_id)
            payload = {
                "source_id": source_id,
                "name": et["name"] or et["slug"],
                "url": et["scheduling_url"],
                "description": et["description_plain"],
                "source_type": _SOURCE_TYPES.get(et["pooling_type"] or "", "One-on-One"),
                "duration_in_minutes": et["duration"],
            }
            url = f"{self.close_url}/scheduling_link/integration/"
            self.call("POST", url, conn["close_access_token"], json=payload).raise_for_status()
        token = conn["close_access_token"]
        stale = [
            link["source_id"]
            for link in self.close_links(token)
            if link["source"] == "THIRD_PARTY"
            and str(link["source_id"]).startswith(f"{user_uuid}:")
            and link["source_id"] not in wanted
        ]
        for source_id in stale:
            url = f"{self.close_url}/scheduling_link/integration/{source_id}/"
            response = self.call("DELETE", url, token)
            if response.status_code != 404:
                response.raise_for_status()


def vm_hwm_mb() -> float:
    """This process's peak resident set (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(data: dict[str, Any], threads: int, limit: int | None, timeout: float) -> dict[str, Any]:
    conns: list[dict[str, str]] = data["users"][:limit] if limit else data["users"]
    deadline = time.monotonic() + timeout
    done, errors, lock = 0, 0, threading.Lock()
    local = threading.local()

    def one(conn: dict[str, str]) -> None:
        nonlocal done, errors
        if time.monotonic() >= deadline:
            return
        peer = getattr(local, "peer", None)
        if peer is None:
            peer = local.peer = Peer(
                data["calendly_api_url"], data["close_api_url"], requests.Session()
            )
        try:
            peer.sync(conn)
            with lock:
                done += 1
        except (requests.RequestException, KeyError, ValueError):
            with lock:
                errors += 1

    cpu0, started = time.process_time(), time.perf_counter()
    if threads <= 1:
        for conn in conns:
            one(conn)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(one, conns))
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "total": len(conns),
        "done": done,
        "errors": errors,
        "timed_out": done + errors < len(conns),
        "peak_rss_mb": vm_hwm_mb(),
        "cpu_seconds": time.process_time() - cpu0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="URLs and tokens (JSON)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="only the first K connections")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the pass")
    args = parser.parse_args(argv)
    data = json.loads(args.input.read_text())
    print(json.dumps(run(data, args.threads, args.limit, args.timeout)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
