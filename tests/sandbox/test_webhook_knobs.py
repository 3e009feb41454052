"""PUT /_sandbox/webhooks/knobs is all or nothing: a 400 for any knob leaves every knob,
counters and config ones alike, as it was."""

from __future__ import annotations

from typing import Any

import pytest

from closesync.sandbox import Sandbox
from tests.sandbox.conftest import admin

BEFORE = {
    "drop_next": 0,
    "duplicate_next": 0,
    "wrong_signature_next": 0,
    "reorder_batch": 0,
    "delay_seconds": 0.0,
    "drop_rate": 0.0,
}


@pytest.mark.parametrize(
    ("body", "word"),
    [
        ({"delay_seconds": 5, "drop_rate": 0.5, "drop_next": -1}, "drop_next"),
        ({"delay_seconds": 5, "duplicate_next": 2, "shuffle": 1}, "shuffle"),
        ({"drop_next": 3, "drop_rate": 1.5}, "drop_rate"),
        ({"drop_next": 3, "delay_seconds": "soon"}, "delay_seconds"),
        ({"drop_rate": 0.5, "wrong_signature_next": True}, "wrong_signature_next"),
    ],
)
def test_put_knobs_with_one_bad_knob_changes_none(
    sandbox: Sandbox, body: dict[str, Any], word: str
) -> None:
    """One bad knob: 400 naming it, and GET /webhooks/knobs answers exactly as before."""
    answer = admin(sandbox, "PUT", "/webhooks/knobs", json=body)
    assert answer.status_code == 400
    assert word in answer.json()["error"]
    assert admin(sandbox, "GET", "/webhooks/knobs").json() == BEFORE


def test_put_knobs_applies_every_good_knob(sandbox: Sandbox) -> None:
    """A good body sets counter and config knobs together and answers them."""
    body = {"delay_seconds": 0.5, "drop_rate": 0.25, "drop_next": 2, "reorder_batch": 0}
    answer = admin(sandbox, "PUT", "/webhooks/knobs", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {**BEFORE, **body}
    assert admin(sandbox, "GET", "/webhooks/knobs").json() == {**BEFORE, **body}
