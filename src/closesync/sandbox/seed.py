"""Deterministic seeding: the same seed gives the same users, event types and tokens.

Each user owns `event_types` types drawn from a ten-slot plan, shifted per user so that a
handful of users with five types each already covers every case the sync must handle:
active standard solo types (the majority), secret, inactive, one-off (`AdhocEventType`),
group, and team types (round robin, collective) shared with one or two other users and so
listed under each of them with the same URI. About one name in ten is null (the slug then
names the type) and about a third of the descriptions are null. Timestamps are fixed dates
in early 2024, not the clock, so two runs with one seed render identically.
"""

from __future__ import annotations

from datetime import UTC, datetime

from closesync.sandbox.config import SandboxConfig
from closesync.sandbox.world import World

_PLAN = (
    "standard",
    "team_round_robin",
    "secret",
    "standard",
    "inactive",
    "adhoc",
    "standard",
    "group",
    "team_collective",
    "standard",
)
_NAMES = (
    "Intro Call",
    "Discovery Call",
    "Product Demo",
    "Onboarding",
    "Office Hours",
    "Quick Chat",
    "Strategy Session",
    "Pipeline Review",
    "Coffee ☕",
    "Café & Roadmap",
)
_DESCRIPTIONS = (
    "A short call to get to know each other.",
    "Walk through the product.\nBring your questions!",
    "Review <your> pipeline & next steps.",
    "Let's plan the quarter — agenda in the invite.",
)
_PEOPLE = (
    "Ada Lovelace",
    "Grace Hopper",
    "Alan Turing",
    "Katherine Johnson",
    "Edsger Dijkstra",
    "Barbara Liskov",
    "Donald Knuth",
    "Frances Allen",
)
_DURATIONS = (15, 30, 30, 45, 60, 90)
_COLORS = ("#8247f5", "#0ae8f0", "#17e885", "#ff4f00", "#e55cff", "#ffa600")
_EPOCH = datetime(2024, 1, 1, tzinfo=UTC).timestamp()


def seed_world(world: World, config: SandboxConfig) -> None:
    """Create `config.users` user pairs and their event types."""
    rng = world.rng
    for i in range(config.users):
        person = _PEOPLE[i] if i < len(_PEOPLE) else f"User {i}"
        world.create_user(name=person, created_at=_EPOCH - 86400 * (config.users - i))
    uuids = [u.calendly_user_uuid for u in world.users()]
    for i, owner in enumerate(uuids):
        for j in range(config.event_types):
            slot = _PLAN[(j + 3 * i) % len(_PLAN)]
            others = [u for u in uuids if u != owner]
            if slot.startswith("team") and not others:
                slot = "standard"
            name: str | None = rng.choice(_NAMES)
            if rng.random() < 0.1:
                name = None
            description = rng.choice(_DESCRIPTIONS) if rng.random() >= 0.3 else None
            created_at = _EPOCH + rng.randrange(0, 90 * 86400)
            members: list[str] = []
            pooling: str | None = None
            if slot.startswith("team"):
                pooling = "round_robin" if slot == "team_round_robin" else "collective"
                members = rng.sample(others, k=min(len(others), rng.choice((1, 2))))
                name = name or "Team Meeting"
            world.create_event_type(
                owner,
                name=name,
                description=description,
                duration=rng.choice(_DURATIONS),
                secret=slot == "secret",
                active=slot != "inactive",
                kind="group" if slot == "group" else "solo",
                pooling_type=pooling,
                type="AdhocEventType" if slot == "adhoc" else "StandardEventType",
                members=members,
                team_name=f"Team {_PEOPLE[i % len(_PEOPLE)].split()[0]}" if pooling else None,
                slug=None if name else f"meeting-{j}",
                color=rng.choice(_COLORS),
                created_at=created_at,
            )
