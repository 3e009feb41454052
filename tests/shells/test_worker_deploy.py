"""Deployment files: compose parses and persists Redis; every setting is documented."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from closesync.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_compose_yaml_parses_redis_aof_worker_scheduler_healthchecks() -> None:
    """Compose defines Redis with AOF persistence and a worker and scheduler with health checks."""
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    services = compose["services"]
    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert "healthcheck" in services["redis"]
    assert services["worker"]["command"] == ["closesync", "worker"]
    assert services["scheduler"]["command"] == ["closesync", "scheduler"]
    for name in ("worker", "scheduler"):
        assert services[name]["healthcheck"]["test"][:3] == ["CMD", "closesync", "health"]
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_web_runs_closesync_web_with_a_healthz_check() -> None:
    """The web service runs `closesync web` (gunicorn), checked on /healthz, with time to drain."""
    web = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())["services"]["web"]
    assert web["command"] == ["closesync", "web"]
    assert "/healthz" in " ".join(web["healthcheck"]["test"])
    grace = int(web["stop_grace_period"].removesuffix("s"))
    assert grace > Settings.model_fields["web_graceful_timeout_seconds"].default


def test_dockerfile_slim_non_root_with_healthcheck() -> None:
    """The image is python:3.11-slim, runs as a non-root user and has a HEALTHCHECK."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users
    assert users[-1] not in ("root", "0")
    assert "HEALTHCHECK" in text
    assert "pip install" in text


def test_procfile_worker_scheduler_and_web_processes() -> None:
    """The Procfile starts a worker, a scheduler and the web process (gunicorn via closesync)."""
    lines = dict(
        line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line
    )
    assert lines["worker"].strip() == "closesync worker"
    assert lines["scheduler"].strip() == "closesync scheduler"
    assert lines["web"].strip() == "closesync web"


def test_env_example_every_setting_with_comment() -> None:
    """.env.example names every Settings variable, each after a comment line."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    documented = {}
    for index, line in enumerate(lines):
        match = re.match(r"^([A-Z0-9_]+)=", line)
        if match:
            documented[match.group(1)] = lines[index - 1].startswith("#")
    expected = {name.upper() for name in Settings.model_fields}
    assert set(documented) == expected
    assert all(documented.values()), [k for k, v in documented.items() if not v]
