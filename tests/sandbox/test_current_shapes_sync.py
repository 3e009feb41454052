"""closesync's engine on the emulator's current-document shapes: a one-off meeting now carries a
profile object, and must still be synced exactly as before (left out unless included)."""

from __future__ import annotations

import uuid

import pytest

from closesync.core.mapping import MappingOptions
from closesync.core.report import Outcome
from closesync.sandbox import Sandbox
from tests.sync_harness import Harness


@pytest.mark.parametrize("include", [False, True])
def test_engine_one_off_with_profile_is_synced_only_when_included(
    sandbox: Sandbox, redis_url: str, include: bool
) -> None:
    """A profiled AdhocEventType is left out by default and becomes a One-Off link when included."""
    harness = Harness.build(
        sandbox, redis_url, f"test-{uuid.uuid4().hex[:8]}", include_one_off_event_types=include
    )
    user = sandbox.users[0]
    created = sandbox.world.create_event_type(
        user.calendly_user_uuid, name="One-off", type="AdhocEventType"
    )
    assert created["profile"] is not None
    source_id = f"{user.calendly_user_uuid}:{created['uri'].rsplit('/', 1)[1]}"
    report = harness.run(harness.add(user))
    assert report.outcome is Outcome.OK, report.errors
    close_side = harness.close_side(user)
    assert close_side == harness.expected(user, MappingOptions(include_one_off=include))
    if include:
        assert close_side[source_id][3] == "One-Off"
    else:
        assert source_id not in close_side
