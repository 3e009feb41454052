"""`closesync sync` and `closesync backfill`: run connections now, in this process.

Inline runs ride out rate limits and transient errors within INLINE_WAIT_BUDGET_SECONDS per
connection (decisions.md), then report the connection as failed. Exit code 1 when any connection
failed; held mass deletions are reported, not failures.

`--concurrency N` connections run at once, each in a thread of this process, sharing its HTTP
sessions; their report lines (and the `--json` list) come in the order the connections were
named (`--all`: the stored order), each as soon as it and those before it are done. One progress
bar on stderr covers the whole set.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from closesync.cli.common import print_json
from closesync.core.errors import CloseSyncError, ConfigError
from closesync.core.report import Outcome, RunMode, RunReport
from closesync.wiring.services import Services, load_services

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

# Connections an inline `sync`/`backfill` runs at once, each in a thread of this process. Each
# mostly waits on the APIs; past a few dozen, this process's one core (the GIL) is the limit, and
# more runs at once spend a Close organization's shared rate limit faster (429s are waited out
# within the budget). Measured (1,000 connections x 6 event types, 100 ms a request, loaded
# 2-core machine): a first run / steady state took 78.9 s / 16.5 s at 16, 51.9 s / 13.7 s at 32.
DEFAULT_CONCURRENCY = 32


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
    parser.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"connections run at once (default {DEFAULT_CONCURRENCY})",
    )


def _connection_ids(services: Services, args: argparse.Namespace) -> list[str]:
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, not {args.concurrency}")
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
    concurrency = min(args.concurrency, max(1, len(ids)))
    # One connection kept open per API for each run at once.
    services.http.reserve(concurrency)

    # Connections a worker's task asked this run to run once more (it met our lock): an inline
    # run does not rerun, so their asks are published as a fresh sync once the runs are done.
    owed: list[str] = []

    def run_one(connection_id: str, bar: SetBar | None) -> RunReport:
        try:
            report = engine.run(
                connection_id,
                mode=mode,
                allow_mass_delete=allow_mass_delete,
                progress=bar.progress_of(connection_id) if bar is not None else None,
                dry_run=dry,
            )
            if not dry and report.failure != "locked" and services.state.pop_rerun(connection_id):
                owed.append(connection_id)
            return report
        except CloseSyncError as error:
            # This connection could not even be read or recorded; the others still run.
            return RunReport(
                connection_id=connection_id,
                mode=mode,
                dry_run=dry,
                started_at=time.time(),
                outcome=Outcome.FAILED,
                failure="error",
                errors=[str(error)],
            )
        finally:
            if bar is not None:
                bar.finished(connection_id)

    reports: list[RunReport] = []
    show_progress = not args.json and sys.stderr.isatty()
    with (
        _bar(len(ids), show_progress) as bar,
        ThreadPoolExecutor(concurrency, thread_name_prefix="closesync-run") as pool,
    ):
        futures = [pool.submit(run_one, connection_id, bar) for connection_id in ids]
        try:
            # In the order given, whatever order they finish in: the output is stable.
            for future in futures:
                report = future.result()
                reports.append(report)
                if not args.json:
                    _print_lines(_report_lines(report), bar)
        except BaseException:
            # Ctrl-C: runs not started are dropped; those under way finish their run.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    if owed:
        _pass_on(services, owed)
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


def _pass_on(services: Services, owed: list[str]) -> None:
    """Publish the syncs workers asked of these inline runs (`holder` markers), so a webhook's
    hint is not lost until the next poll; a broker that cannot be reached is only warned of."""
    from closesync.worker.enqueue import enqueue_sync

    try:
        enqueue_sync(services, sorted(owed))
    except CloseSyncError as error:
        sys.stderr.write(f"warning: syncs asked during this run were not enqueued: {error}\n")


class SetBar:
    """One progress bar for a whole set of runs: connections done of all, the writes of the
    runs so far (done/planned), and the connection last heard from. Safe across threads."""

    def __init__(self, progress: Progress, task: TaskID, console: Console) -> None:
        self._progress = progress
        self._task = task
        self.console = console
        self._writes: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def progress_of(self, connection_id: str) -> Callable[[int, int], None]:
        """The engine's progress callback for the run of `connection_id`."""

        def show(done: int, total: int) -> None:
            with self._lock:
                self._writes[connection_id] = (done, total)
                done_all = sum(d for d, _ in self._writes.values())
                total_all = sum(t for _, t in self._writes.values())
            self._progress.update(
                self._task, description=connection_id, writes=f"{done_all}/{total_all} writes"
            )

        return show

    def finished(self, connection_id: str) -> None:
        """One more connection done (whatever its outcome)."""
        self._progress.update(self._task, advance=1, description=connection_id)


def _print_lines(lines: list[str], bar: SetBar | None) -> None:
    """Report lines on stdout; above the bar when stdout is the bar's terminal too, since a line
    written under a live bar is drawn over by its next refresh."""
    if bar is not None and sys.stdout.isatty():
        for line in lines:
            bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
        return
    sys.stdout.write("".join(f"{line}\n" for line in lines))


@contextmanager
def _bar(total: int, enabled: bool, console: Console | None = None) -> Iterator[SetBar | None]:
    """The progress bar of a set of `total` runs on stderr, gone when they end.

    Yields None (and writes nothing) when disabled or when the console is not an interactive
    terminal (TTY_COMPATIBLE=0, TERM=dumb).
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
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TextColumn("connections  {task.fields[writes]}  {task.description}"),
        console=console,
        # Erased when the runs end, so the report lines stand alone.
        transient=True,
        # The bar is on stderr; the reports on stdout must stay on stdout (a pipe, `tee`).
        redirect_stdout=False,
    ) as progress:
        task = progress.add_task("", total=total, writes="0/0 writes")
        yield SetBar(progress, task, console)


def _report_lines(report: RunReport) -> list[str]:
    counts = (
        f"created {report.created}, updated {report.updated}, deleted {report.deleted}, "
        f"unchanged {report.unchanged}"
    )
    calls = sum(report.api_calls.values())
    mode = f"{report.mode.value} (dry run)" if report.dry_run else report.mode.value
    lines = [
        f"{report.connection_id}  {mode}  {report.outcome.value}  {counts}  ({calls} API calls)"
    ]
    lines.extend(f"    {planned}" for planned in (report.planned if report.dry_run else []))
    if report.held_deletions:
        lines.append(f"    held {len(report.held_deletions)} deletions: {report.held_reason}")
    lines.extend(f"    failed {key}: {error}" for key, error in report.failed.items())
    lines.extend(f"    error: {error}" for error in report.errors)
    return lines


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
