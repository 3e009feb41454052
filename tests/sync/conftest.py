"""Fixtures of the engine tests: a seeded sandbox with a frozen clock, and a harness on it.

A module that needs another world (more users, other seeds) overrides `sandbox`; the harness
then builds on that one.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from closesync.sandbox import Sandbox, SandboxConfig
from tests.sync_harness import Harness


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    """Three users with eight event types each, the clock frozen; stopped after the test."""
    sb = Sandbox.start(SandboxConfig(seed=7, users=3, event_types=8, freeze_clock=True))
    try:
        yield sb
    finally:
        sb.stop()


@pytest.fixture
def harness(sandbox: Sandbox, redis_url: str) -> Harness:
    """Services on a real Redis under a key prefix of its own, an engine with a fake sleep."""
    return Harness.build(sandbox, redis_url, f"test-{uuid.uuid4().hex[:8]}")
