"""Fixtures of the API-layer tests: a fresh sandbox per test and a fake clock on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from closesync.sandbox import Sandbox
from tests._sandbox import FakeClock, running_sandbox


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    """A running sandbox, stopped after the test."""
    with running_sandbox() as sandbox:
        yield sandbox


@pytest.fixture
def fake(sb: Sandbox) -> FakeClock:
    """A fake clock and sleep that advance the sandbox's clock instead of waiting."""
    return FakeClock(sb)
