"""The `closesync sandbox` command as a subprocess: it prints URLs and tokens, or exits 2."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from closesync.sandbox.config import CALENDLY_WEBHOOK_SIGNING_KEY

BIN = Path(sys.executable).parent / "closesync"


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN), "sandbox", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_cli_json_prints_urls_and_tokens_then_exits_0_on_sigterm() -> None:
    """--json prints one object with the four URLs and each user's tokens; SIGTERM exits 0."""
    proc = _start("--calendly-port", "0", "--close-port", "0", "--users", "2", "--json")
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.rstrip() == "}":
            break
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    info = json.loads("".join(lines))
    assert set(info["urls"]) == {
        "CALENDLY_API_URL",
        "CALENDLY_AUTH_URL",
        "CLOSE_API_URL",
        "CLOSE_OAUTH_URL",
    }
    assert info["urls"]["CLOSE_API_URL"].endswith("/api/v1")
    assert info["users"][1]["calendly_token"].startswith("cal_pat_")
    assert info["oauth_apps"]["CALENDLY_WEBHOOK_SIGNING_KEY"] == CALENDLY_WEBHOOK_SIGNING_KEY
    assert info["webhooks"][0] == info["urls"]["CALENDLY_API_URL"] + "/webhook_subscriptions"


def test_cli_text_prints_export_lines() -> None:
    """Text mode prints `export CALENDLY_API_URL=…` lines and a token per user; SIGINT exits 0."""
    proc = _start("--calendly-port", "0", "--close-port", "0", "--users", "1")
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "export CALENDLY_CLIENT_SECRET" in line:
            break
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0
    text = "".join(lines)
    assert "export CALENDLY_API_URL=http://127.0.0.1:" in text
    assert "close_access_token   close_at_" in text


def test_cli_port_in_use_exits_2_naming_the_port() -> None:
    """A taken port is one clear error line and exit code 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _start("--calendly-port", str(port), "--close-port", "0")
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert err.strip() == f"closesync sandbox: port {port} on 127.0.0.1 is already in use"
