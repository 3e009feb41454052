"""`closesync demo`: the whole system on one machine, converging while Calendly changes.

It starts the sandbox (both APIs), an embedded Redis unless REDIS_URL is set, seeds a
connection per sandbox user, starts a real worker and a real scheduler as child processes (the
same `closesync worker` and `closesync scheduler` a deployment runs), changes event types in the
sandbox while they run, and shows the Close side converging in a live table. It stops by itself
after a bounded time, or on Ctrl-C, and leaves nothing running.

The demo needs no setup, yet stores no token in the clear: it seals its grants with a Fernet key
of its own, drawn for the run and handed to its children only. Its Redis keys are wiped at every
start, so nothing ever needs that key again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from closesync.core.calendly_payloads import EventType
from closesync.core.mapping import MappingOptions, map_event_types
from closesync.sandbox import (
    CALENDLY_CLIENT_ID,
    CALENDLY_CLIENT_SECRET,
    CLOSE_CLIENT_ID,
    CLOSE_CLIENT_SECRET,
    Sandbox,
    SandboxConfig,
)
from closesync.sandbox.connections import sandbox_connection, sandbox_settings
from closesync.sandbox.records import SeededUser
from closesync.settings import Settings
from closesync.store.embedded import embedded
from closesync.store.secretbox import generate_key
from closesync.wiring.services import Services

# A tick every 5 seconds: fast enough to watch, slow enough to read.
DEMO_CRON = "*/5 * * * * *"
DEMO_PREFIX = "closesync-demo"


@dataclass
class DemoOptions:
    seconds: float = 75.0
    users: int = 3
    event_types: int = 6
    seed: int = 7
    data_dir: str = "var/demo"
    # Seconds between two scripted changes in the sandbox's Calendly.
    change_every: float = 9.0


@dataclass
class Demo:
    options: DemoOptions
    sandbox: Sandbox
    services: Services
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    connections: dict[str, SeededUser] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    last_frame: str = ""

    # -- the Close side against the Calendly side ----------------------------------------------

    def expected(self, user: SeededUser) -> dict[str, tuple[Any, ...]]:
        world = self.sandbox.world
        types = [
            EventType.model_validate(i)
            for i in world.list_event_types(user.calendly_user_uuid, None)
        ]
        links = map_event_types(user.calendly_user_uuid, types, MappingOptions()).links
        return {
            sid: (p.name, p.url, p.description, p.duration_in_minutes) for sid, p in links.items()
        }

    def in_close(self, user: SeededUser) -> dict[str, tuple[Any, ...]]:
        return {
            link["source_id"]: (
                link["name"],
                link["url"],
                link["description"],
                link["duration_in_minutes"],
            )
            for link in self.sandbox.world.close_links(user.close_user_id)
            if link["source"] == "THIRD_PARTY"
        }

    def rows(self) -> list[tuple[str, str, int, int, bool, str]]:
        rows = []
        for conn_id, user in self.connections.items():
            want, have = self.expected(user), self.in_close(user)
            last = self.services.state.last_report(conn_id)
            outcome = (
                f"{last.outcome.value} +{last.created} ~{last.updated} -{last.deleted}"
                if last
                else "-"
            )
            rows.append((conn_id, user.email, len(want), len(have), want == have, outcome))
        return rows

    def converged(self) -> bool:
        return all(row[4] for row in self.rows())


def _settings(sandbox: Sandbox, redis_url: str) -> Settings:
    return Settings(
        _env_file=None,
        redis_url=redis_url,
        redis_prefix=DEMO_PREFIX,
        sync_cron=DEMO_CRON,
        closesync_encryption_keys=generate_key(),
        **sandbox_settings(sandbox),
    )


def _child_env(settings: Settings) -> dict[str, str]:
    # "CLOSE" also drops the caller's CLOSESYNC_* (its keys, a plaintext allowance).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOSE", "CALENDLY", "REDIS"))}
    assert settings.closesync_encryption_keys is not None  # noqa: S101 - _settings draws one
    env.update(
        CLOSESYNC_ENCRYPTION_KEYS=settings.closesync_encryption_keys.get_secret_value(),
        REDIS_URL=settings.redis_url or "",
        REDIS_PREFIX=settings.redis_prefix,
        CLOSE_API_URL=settings.close_api_url,
        CLOSE_OAUTH_URL=settings.close_oauth_url,
        CALENDLY_API_URL=settings.calendly_api_url,
        CALENDLY_AUTH_URL=settings.calendly_auth_url,
        CLOSE_CLIENT_ID=CLOSE_CLIENT_ID,
        CLOSE_CLIENT_SECRET=CLOSE_CLIENT_SECRET,
        CALENDLY_CLIENT_ID=CALENDLY_CLIENT_ID,
        CALENDLY_CLIENT_SECRET=CALENDLY_CLIENT_SECRET,
        SYNC_CRON=DEMO_CRON,
        LOG_LEVEL="WARNING",
        LOG_FORMAT="json",
        SENTRY_DSN="",
    )
    return env


def _seed(demo: Demo) -> None:
    """One connection per sandbox user, as `closesync connections add` would store it."""
    now = time.time()
    for user in demo.sandbox.users:
        connection, grants = sandbox_connection(user, now, name=user.name)
        demo.services.connections.save(connection, grants)
        demo.connections[connection.id] = user


def _changes(demo: Demo) -> list[tuple[str, Callable[[], object]]]:
    """The scripted edits made in Calendly while the system runs."""
    world = demo.sandbox.world
    first, second = demo.sandbox.users[0], demo.sandbox.users[-1]
    mine = [
        e["uri"].rsplit("/", 1)[-1] for e in world.list_event_types(first.calendly_user_uuid, True)
    ]
    theirs = [
        e["uri"].rsplit("/", 1)[-1] for e in world.list_event_types(second.calendly_user_uuid, True)
    ]
    return [
        (
            f"{first.name}: rename an event type to 'Discovery call (renamed)'",
            lambda: world.update_event_type(mine[0], name="Discovery call (renamed)"),
        ),
        (
            f"{second.name}: create 'Demo: pricing walkthrough'",
            lambda: world.create_event_type(
                second.calendly_user_uuid, name="Demo: pricing walkthrough"
            ),
        ),
        (
            f"{first.name}: deactivate an event type",
            lambda: world.update_event_type(mine[-1], active=False),
        ),
        (f"{second.name}: delete an event type", lambda: world.delete_event_type(theirs[0])),
        (
            f"{first.name}: change a duration to 45 minutes",
            lambda: world.update_event_type(mine[1], duration=45),
        ),
    ]


_STATE_STYLES = {"in sync": "green", "syncing": "yellow"}


def _view(
    rows: list[tuple[str, str, int, int, bool, str]], log: list[str], elapsed: float
) -> Group:
    """The live view on a terminal: a title, the table, and the last edits made in Calendly."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    # Ids are what people copy; the other columns fold first on a narrow terminal.
    table.add_column("CONNECTION", no_wrap=True)
    table.add_column("USER", overflow="fold")
    table.add_column("CALENDLY", justify="right")
    table.add_column("CLOSE", justify="right")
    table.add_column("STATE", no_wrap=True)
    table.add_column("LAST RUN", overflow="fold")
    for conn_id, email, want, have, same, outcome in rows:
        state = "in sync" if same else "syncing"
        # Text, not str: nothing from the data is read as rich markup.
        table.add_row(
            Text(conn_id),
            Text(email),
            str(want),
            str(have),
            Text(state, style=_STATE_STYLES[state]),
            Text(outcome),
        )
    return Group(
        Text(f"closesync demo - {elapsed:5.1f} s - a scheduled sync every 5 s (Ctrl-C to stop)"),
        Text(""),
        table,
        Text(""),
        Text("Changes made in Calendly:"),
        *[Text(f"  {entry}") for entry in log[-6:]],
    )


def _render(demo: Demo, elapsed: float, live: Live | None) -> None:
    rows = demo.rows()
    if live is not None:
        live.update(_view(rows, demo.log, elapsed), refresh=True)
        return
    # Without a terminal: plain lines, and a frame only when the table changed.
    lines = [f"{'CONNECTION':18} {'USER':22} {'CALENDLY':>8} {'CLOSE':>6}  {'STATE':9} LAST RUN"]
    for conn_id, email, want, have, same, outcome in rows:
        state = "in sync" if same else "syncing"
        lines.append(f"{conn_id:18} {email:22} {want:>8} {have:>6}  {state:9} {outcome}")
    frame = "\n".join([*lines, *demo.log[-1:]])
    if frame == demo.last_frame:
        return
    demo.last_frame = frame
    sys.stdout.write(f"--- {elapsed:5.1f} s\n{frame}\n")
    sys.stdout.flush()


def _start_children(demo: Demo, env: dict[str, str], logs: Path) -> None:
    for role in ("worker", "scheduler"):
        out = (logs / f"{role}.log").open("wb")
        demo.children.append(
            subprocess.Popen(
                [sys.executable, "-m", "closesync", role], env=env, stdout=out, stderr=out
            )
        )


def _stop_children(demo: Demo) -> None:
    for child in demo.children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for child in demo.children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _stop_live(live: Live | None) -> None:
    """End the live view (it keeps its last frame), so what is written next lands below it."""
    if live is not None:
        live.stop()


def run_demo(options: DemoOptions, redis_url: str | None) -> int:
    """Run the demo; 0 when every connection ended in sync."""
    data = Path(options.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    url = redis_url or embedded(str(data))
    sandbox = Sandbox.start(
        SandboxConfig(seed=options.seed, users=options.users, event_types=options.event_types)
    )
    settings = _settings(sandbox, url)
    demo = Demo(options, sandbox, Services.build(settings))
    for key in demo.services.redis.scan_iter(f"{DEMO_PREFIX}:*"):
        demo.services.redis.delete(key)
    # On a terminal the table is redrawn in place; otherwise plain frames (a log, CI, a pipe).
    live = Live(console=Console(), auto_refresh=False) if sys.stdout.isatty() else None
    try:
        _seed(demo)
        _start_children(demo, _child_env(settings), data)
        if live is not None:
            live.start()
        changes = _changes(demo)
        started = time.monotonic()
        next_change = started + options.change_every
        while time.monotonic() - started < options.seconds:
            now = time.monotonic()
            if changes and now >= next_change:
                text, change = changes.pop(0)
                change()
                demo.log.append(f"{now - started:5.1f} s  {text}")
                next_change = now + options.change_every
            _render(demo, now - started, live)
            if not changes and demo.converged():
                break
            for child in demo.children:
                if child.poll() is not None:
                    _stop_live(live)
                    sys.stderr.write(f"closesync demo: a child process exited; see {data}/*.log\n")
                    return 1
            time.sleep(1.0)
        ok = demo.converged()
        _render(demo, time.monotonic() - started, live)
        _stop_live(live)
        sys.stdout.write(
            "\nEvery connection's Close links equal its Calendly event types.\n"
            if ok
            else f"\nNot converged yet; logs are in {data}/.\n"
        )
        return 0 if ok else 1
    except KeyboardInterrupt:
        return 130
    finally:
        _stop_live(live)
        _stop_children(demo)
        sandbox.stop()
