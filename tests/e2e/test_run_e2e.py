"""`closesync run` on a machine without Redis: embedded Redis, worker and scheduler together."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable

import pytest

from closesync.sandbox import Sandbox
from closesync.wiring.services import Services
from tests.e2e.conftest import Deployment, converged, wait_for
from tests.redis_server import answers

pytestmark = pytest.mark.e2e


def test_run_without_redis_url_embedded_redis_schedules_and_syncs(
    deploy: Callable[..., Deployment], sandbox: Sandbox
) -> None:
    """Without REDIS_URL, `run` starts an embedded Redis, schedules ticks and syncs them."""
    deployment = deploy()
    env = {k: v for k, v in deployment.env.items() if k != "REDIS_URL"}
    deployment.env = env
    proc = deployment.start("run", "--concurrency", "1")
    registry = deployment.workdir / "var" / "embedded.json"
    url = wait_for("the embedded Redis", lambda: registry.exists() and registry.read_text(), 20)
    embedded_url = json.loads(url)["url"]
    settings = deployment.settings.model_copy(update={"redis_url": embedded_url})
    services = Services.build(settings)
    user = sandbox.users[0]
    deployment.services = services
    deployment.add_connection(user)
    wait_for("the scheduled tick to sync Close", lambda: converged(sandbox, user), 30)

    proc.kill_group(signal.SIGTERM)
    proc.popen.wait(timeout=20)
    services.redis.close()
    wait_for("the embedded Redis to stop with its owner", lambda: not answers(embedded_url), 10)
