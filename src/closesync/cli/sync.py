"""`closesync sync` and `closesync backfill`: run connections now, in this process.

Inline runs ride out rate limits and transient errors within INLINE_WAIT_BUDGET_SECONDS per
connection (decisions.md), then report the connection as failed. Exit code 1 when any connection
failed; held mass deletions are reported, not failures.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from closesync.cli.common import print_json
from closesync.core.errors import CloseSyncError, ConfigError
from closesync.core.report import Outcome, RunMode, RunReport
from closesync.wiring.services import Services, load_services

if TYPE_CHECKING:
    from rich.console import Console


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    sync = subparsers.add_parser("sync", help="sync connections now")
    _targets(sync)
    sync.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    sync.add_argument(
        "--allow-mass-delete", action="store_true", help="let held mass deletions through"
    )
    sync.add_argument(
        "--enqueue", action="store_true", help="enqueue the sync for the workers instead"
    )
    sync.set_defaults(func=cmd_sync)

    backfill = subparsers.add_parser(
        "backfill", help="full reconciliation against what Close holds (heals lost state)"
    )
    _targets(backfill)
    backfill.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    backfill.add_argument(
        "--enqueue", action="store_true", help="enqueue the backfill for the workers instead"
    )
    backfill.set_defaults(func=cmd_backfill)


def _targets(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ids", nargs="*", metavar="ID", help="connection ids")
    parser.add_argument("--all", action="store_true", help="every active connection")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _connection_ids(services: Services, args: argparse.Namespace) -> list[str]:
    if args.all and args.ids:
        raise ConfigError("give connection ids or --all, not both")
    if not args.all and not args.ids:
        raise ConfigError("name the connections to run (IDs) or pass --all")
    if args.all:
        return [c.id for c in services.connections.list() if c.state.value == "active"]
    for connection_id in args.ids:
        services.connections.get(connection_id)  # ConnectionNotFound before any run starts
    return list(dict.fromkeys(args.ids))


def cmd_sync(args: argparse.Namespace) -> int:
    services = load_services()
    ids = _connection_ids(services, args)
    if args.enqueue:
        from closesync.worker.enqueue import enqueue_sync

        return _print_enqueued(enqueue_sync(services, ids if not args.all else None), args.json)
    return _run_all(
        services,
        ids,
        RunMode.SYNC,
        args,
        allow_mass_delete=args.allow_mass_delete,
        dry=args.dry_run,
    )


def cmd_backfill(args: argparse.Namespace) -> int:
    services = load_services()
    ids = _connection_ids(services, args)
    if args.enqueue:
        from closesync.worker.enqueue import enqueue_backfill

        return _print_enqueued(enqueue_backfill(services, ids), args.json)
    if args.dry_run:
        # A backfill's plan is the drift check's: Close as it is against what is desired.
        return _run_all(services, ids, RunMode.DRIFT, args, dry=True)
    return _run_all(services, ids, RunMode.BACKFILL, args)


def _run_all(
    services: Services,
    ids: list[str],
    mode: RunMode,
    args: argparse.Namespace,
    *,
    allow_mass_delete: bool = False,
    dry: bool = False,
) -> int:
    services.require_key()  # an inline run reads (and may refresh) tokens
    engine = services.engine(wait_budget=services.settings.inline_wait_budget_seconds)
    reports: list[RunReport] = []
    show_progress = not args.json and sys.stderr.isatty()
    for connection_id in ids:
        with _bar(connection_id, show_progress) as progress:
            try:
                report = engine.run(
                    connection_id,
                    mode=mode,
                    allow_mass_delete=allow_mass_delete,
                    progress=progress,
                    dry_run=dry,
                )
            except CloseSyncError as error:
                # This connection could not even be read or recorded; the others still run.
                report = RunReport(
                    connection_id=connection_id,
                    mode=mode,
                    dry_run=dry,
                    started_at=time.time(),
                    outcome=Outcome.FAILED,
                    failure="error",
                    errors=[str(error)],
                )
        reports.append(report)
        if not args.json:
            _print_report(report)
    # A connection another process is running was not synced by this command: say so in the
    # exit code too (the run in progress picks the request up when it ends).
    failed = [r for r in reports if r.outcome is Outcome.FAILED or r.failure == "locked"]
    if args.json:
        print_json(
            {
                "ok": not failed,
                "connections": [r.model_dump(mode="json") for r in reports],
            }
        )
    elif not ids:
        sys.stdout.write("no active connections\n")
    return 1 if failed else 0


@contextmanager
def _bar(
    connection_id: str, enabled: bool, console: Console | None = None
) -> Iterator[Callable[[int, int], None] | None]:
    """One connection's progress bar on stderr (its id, the bar, done/total), gone when it ends.

    Yields the engine's progress callback, or None (and writes nothing) when disabled or when
    the console is not an interactive terminal (TTY_COMPATIBLE=0, TERM=dumb).
    """
    if not enabled:
        yield None
        return
    # Imported here: this module is loaded at startup for every command, and rich costs ~30-60 ms.
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = console or Console(stderr=True)
    if not console.is_interactive:
        # rich would still print a blank line when the bar stops; a bar no one sees is nothing.
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        console=console,
        # Erased when the run ends, so the report line printed next stands alone.
        transient=True,
        # The bar is on stderr; the reports on stdout must stay on stdout (a pipe, `tee`).
        redirect_stdout=False,
    ) as bar:
        task = bar.add_task(connection_id, total=None)

        def show(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield show


def _print_report(report: RunReport) -> None:
    counts = (
        f"created {report.created}, updated {report.updated}, deleted {report.deleted}, "
        f"unchanged {report.unchanged}"
    )
    calls = sum(report.api_calls.values())
    mode = f"{report.mode.value} (dry run)" if report.dry_run else report.mode.value
    line = f"{report.connection_id}  {mode}  {report.outcome.value}  {counts}"
    sys.stdout.write(f"{line}  ({calls} API calls)\n")
    for planned in report.planned if report.dry_run else []:
        sys.stdout.write(f"    {planned}\n")
    if report.held_deletions:
        sys.stdout.write(f"    held {len(report.held_deletions)} deletions: {report.held_reason}\n")
    for key, error in report.failed.items():
        sys.stdout.write(f"    failed {key}: {error}\n")
    for error in report.errors:
        sys.stdout.write(f"    error: {error}\n")


def _print_enqueued(done: dict[str, object], json_output: bool) -> int:
    """What `--enqueue` put on the queues, as JSON or a line per task."""
    if json_output:
        print_json(done)
        return 0
    if "tick" in done:
        slot = done["slot"]
        if done["enqueued"]:
            sys.stdout.write(f"enqueued the sync tick {slot}\n")
        else:
            sys.stdout.write(f"the sync tick {slot} was already enqueued\n")
        return 0
    ids = done["enqueued"]
    assert isinstance(ids, list)  # noqa: S101 - enqueue_sync/enqueue_backfill return a list here
    for connection_id in ids:
        sys.stdout.write(f"enqueued {done['task']} of {connection_id}\n")
    coalesced = done.get("already_queued") or []
    assert isinstance(coalesced, list)  # noqa: S101 - enqueue_sync returns a list here
    for connection_id in coalesced:
        sys.stdout.write(f"a {done['task']} of {connection_id} is already queued or running\n")
    if not ids and not coalesced:
        sys.stdout.write("no active connections\n")
    return 0
