"""`closesync demo`, as `make demo` runs it on a machine without Redis: it converges and exits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

CLOSESYNC = str(Path(sys.executable).with_name("closesync"))


def test_demo_without_redis_converges_and_exits_zero(tmp_path: Path) -> None:
    """The demo starts everything itself, makes its Calendly edits and ends in sync."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REDIS", "CLOSE", "CALENDLY", "SENTRY", "TEST_REDIS"))
    }
    env["DATA_DIR"] = str(tmp_path / "var")
    done = subprocess.run(
        [CLOSESYNC, "demo", "--seconds", "60", "--change-every", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Every connection's Close links equal its Calendly event types." in done.stdout
    assert "delete an event type" in done.stdout
