"""Token sets of `connections import`: parsing JSON lines and grouping lines that must not race."""

from __future__ import annotations

import json

from closesync.core.token_set import independent_groups, parse_token_lines

SECRET = "close_at_s3cret"


def test_parse_token_lines_problems_name_line_and_field_never_the_value() -> None:
    """Each bad line is named by number and field; no problem quotes what the line holds."""
    lines = [
        json.dumps({"close_access_token": "a", "calendly_token": "b", "name": "Ann"}),
        "",
        SECRET,
        json.dumps([SECRET]),
        json.dumps({"close_access_token": SECRET, "calendly_token": 7}),
        json.dumps({"close_access_token": "a", "calendly_token": "b", SECRET: "x"}),
        json.dumps({"close_access_token": "a", "calendly_token": "b", "close_expires_in": "60"}),
    ]
    found, problems = parse_token_lines(lines)
    assert [(t.number, t.tokens.name) for t in found] == [(1, "Ann")]
    assert problems == [
        "line 3 is not JSON (column 1)",
        "line 4 is not a JSON object",
        "line 5: calendly_token: Input should be a valid string",
        "line 6: a field that is not one of a token set (its name could be a token)",
        "line 7: close_expires_in: Input should be a valid integer",
    ]
    assert not any(SECRET in problem for problem in problems)


def test_independent_groups_lines_sharing_a_key_stay_together_in_file_order() -> None:
    """Lines linked through any shared key form one group, in line order; groups by first line."""
    keys = [
        ["close:a", "cal:1"],
        ["close:b", "cal:2"],
        ["close:c", "cal:1"],
        [],
        ["cal:2", "cal:3"],
    ]
    assert independent_groups(keys) == [[0, 2], [1, 4], [3]]
    # A chain: 0-1 share cal:x, 1-2 share close:q; 3 alone.
    chain = [["cal:x"], ["cal:x", "close:q"], ["close:q"], ["close:z"]]
    assert independent_groups(chain) == [[0, 1, 2], [3]]
