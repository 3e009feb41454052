"""REDIS_URL may name a Sentinel: the state client finds the master through a real sentinel."""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from limits import RateLimitItemPerMinute

from closesync.core.errors import StoreUnavailable
from closesync.store.client import connect, redacted_url
from closesync.store.keys import Keys
from closesync.store.rate_budget import RateBudgets
from tests.redis_server import RedisServer, free_port, redis_executable


@pytest.fixture
def sentinel_url() -> Iterator[str]:
    """A real master and one real sentinel (redis-server --sentinel) watching it."""
    with RedisServer() as master, tempfile.TemporaryDirectory() as folder:
        master_port = int(master.url.rsplit(":", 1)[1].split("/")[0])
        port = free_port()
        config = Path(folder) / "sentinel.conf"
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
            f"sentinel monitor closesync-test 127.0.0.1 {master_port} 1\n"
        )
        process = subprocess.Popen(
            [redis_executable(), str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            probe = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
            deadline = time.monotonic() + 10
            while True:
                try:
                    if probe.execute_command("SENTINEL", "MASTERS"):
                        break
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail("the sentinel did not come up")
                time.sleep(0.05)
            yield f"sentinel://127.0.0.1:{port}/2?master_name=closesync-test"
        finally:
            process.terminate()
            process.wait(timeout=10)


def test_connect_sentinel_url_reaches_the_master(sentinel_url: str) -> None:
    """connect() follows a sentinel:// URL to the master and writes there."""
    client = connect(sentinel_url)
    client.set("closesync-sentinel-probe", "ok")
    assert client.get("closesync-sentinel-probe") == "ok"
    assert client.connection_pool.connection_kwargs["db"] == 2


def test_rate_budget_sentinel_clients_share_one_budget(sentinel_url: str) -> None:
    """The rate budget runs on the Sentinel-found master through closesync's own clients."""
    per_minute = RateLimitItemPerMinute(2)
    first, second = (
        RateBudgets(
            connect(sentinel_url),
            Keys("sentinel-budget"),
            close_org=per_minute,
            close_user=per_minute,
            calendly_user=per_minute,
        ).close("orga_1", user)
        for user in ("user_a", "user_b")
    )
    group = "POST /scheduling_link/integration/"
    assert [first.take(group), second.take(group)] == [0.0, 0.0]
    assert first.take(group) > 0
    second.block("GET /scheduling_link/", 30)
    assert first.take("GET /scheduling_link/") > 20


def test_connect_sentinel_unknown_master_is_store_unavailable(sentinel_url: str) -> None:
    """A master name the sentinel does not know gives StoreUnavailable naming the URL."""
    wrong = sentinel_url.replace("closesync-test", "nobody")
    with pytest.raises(StoreUnavailable, match="cannot be reached"):
        connect(wrong)


def test_redacted_url_sentinel_parts_lose_their_password() -> None:
    """Each part of a multi-host Sentinel URL is shown without its password."""
    url = "sentinel://:pw1@a:26379;sentinel://:pw2@b:26379/0?master_name=m"
    assert redacted_url(url) == "sentinel://a:26379;sentinel://b:26379/0?master_name=m"
