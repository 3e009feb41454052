"""CPU per steady-state run: what one worker process spends on a connection whose Calendly did
not change, measured so that it can be compared across versions on a noisy shared machine.

The fleet benchmark's tick time depends on everything the machine does meanwhile; this counts
only the CPU seconds (time.process_time) of the process that runs the connections, with the
sandbox in a process of its own (benchmarks.sandbox_host, no latency) and a real Redis, so the
figure is the closesync side's work alone, set up as a worker is (tokens sealed with a key, INFO
lines formatted as JSON). Each run goes through the Celery task's own body
(`closesync.worker.tasks.run_connection`: sync marker, engine, rerun check), one after another.
The first pass (every link created) is not measured; then `--rounds` passes over the fleet are
timed and the least CPU per run is kept (noise only ever adds time).

    python -m benchmarks.run_cpu                       # 200 connections, 5 rounds
    python -m benchmarks.run_cpu --profile 25          # and cProfile's top 25 (by own time)
    python -m benchmarks.run_cpu --baseline /tmp/main/src   # the same, beside another version

`--baseline DIR` runs this script again with DIR (the `src` of another checkout, e.g. main's,
extracted with `git archive main src | tar -x -C /tmp/main`) first on PYTHONPATH, alternating
the two versions `--repeat` times, and prints each one's best and the ratio. Numbers, not
assertions; traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from benchmarks.fleet import (
    REPO,
    SandboxProcess,
    redis_for_benchmark,
    seed_connections,
    stop_embedded,
)


def measure(n: int, rounds: int, profile: int, workdir: Path) -> dict[str, Any]:
    """CPU seconds per steady run of n connections, best of `rounds` passes."""
    import closesync
    from closesync.core.report import RunMode
    from closesync.settings import Settings
    from closesync.store.secretbox import generate_key
    from closesync.wiring.logs import configure
    from closesync.wiring.services import Services
    from closesync.worker import tasks

    # As a worker runs: its INFO lines formatted as JSON (to nowhere), tokens sealed.
    configure("INFO", "json", stream=open(os.devnull, "w"))  # noqa: SIM115 - for the process

    redis_url = redis_for_benchmark(workdir)
    with SandboxProcess.running(n, 0.0, workdir) as sandbox:
        values = {
            "redis_url": redis_url,
            "redis_prefix": f"cpu-{uuid.uuid4().hex[:6]}",
            "data_dir": str(workdir / "var"),
            "closesync_encryption_keys": generate_key(),
            "log_format": "json",
            **{k.lower(): v for k, v in sandbox.env().items()},
        }
        settings = Settings(_env_file=None, **values)
        services = Services.build(settings)
        tasks.use_services(services)
        ids = seed_connections(services, sandbox.users)

        def one_pass() -> float:
            started = time.process_time()
            for conn_id in ids:
                task = SimpleNamespace(request=SimpleNamespace(id=str(uuid.uuid4()), retries=0))
                outcome = tasks.run_connection(task, conn_id, RunMode.SYNC)  # type: ignore[arg-type]
                if outcome != "ok":
                    raise SystemExit(f"a run of {conn_id} ended {outcome}: see the logs")
            return time.process_time() - started

        one_pass()  # the first run: every link created
        sandbox.reset_counts()
        per_run = min(one_pass() for _ in range(rounds)) / n
        calendly, close = sandbox.calls()
        result: dict[str, Any] = {
            "version": str(Path(closesync.__file__).parent),
            "cpu_ms_per_run": per_run * 1000,
            "calendly_calls_per_run": calendly / (n * rounds),
            "close_calls_per_run": close / (n * rounds),
        }
        if profile:
            # CPU time, not wall time: waiting on a socket costs nothing here.
            profiler = cProfile.Profile(time.process_time)
            profiler.enable()
            one_pass()
            profiler.disable()
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("tottime").print_stats(profile)
            stats.sort_stats("cumulative").print_stats(profile)
            # closesync's own functions, to see which step the library time above belongs to.
            stats.sort_stats("cumulative").print_stats("/closesync/", profile)
            result["profile"] = out.getvalue()
        tasks.use_services(None)
        services.close()
        services.redis.close()
    return result


def compare(args: argparse.Namespace) -> int:
    """Alternate this checkout and the baseline, `--repeat` times each; print best and ratio."""
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        for label, path in (("this", None), ("baseline", args.baseline)):
            env = dict(os.environ)
            if path:
                env["PYTHONPATH"] = os.pathsep.join([str(Path(path).resolve()), str(REPO)])
            command = [sys.executable, "-m", "benchmarks.run_cpu", "--json"]
            command += ["--n", str(args.n), "--rounds", str(args.rounds)]
            out = subprocess.run(
                command, check=False, env=env, cwd=REPO, capture_output=True, text=True
            )
            if out.returncode != 0:
                raise SystemExit(f"{label} failed: {out.stderr[-2000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            ms = float(result["cpu_ms_per_run"])
            print(f"{label:>8}: {ms:6.2f} ms CPU per steady run ({result['version']})", flush=True)
            best[label] = min(best.get(label, ms), ms)
    print(
        f"best: this {best['this']:.2f} ms, baseline {best['baseline']:.2f} ms, "
        f"ratio {best['this'] / best['baseline']:.2f}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="connections (6 event types each)")
    parser.add_argument("--rounds", type=int, default=5, help="timed steady passes; best kept")
    parser.add_argument("--profile", type=int, default=0, help="print cProfile's top N functions")
    parser.add_argument("--baseline", help="the src directory of another version to compare")
    parser.add_argument("--repeat", type=int, default=3, help="alternations with --baseline")
    parser.add_argument("--json", action="store_true", help="one JSON line (for --baseline)")
    args = parser.parse_args(argv)
    if args.baseline:
        return compare(args)
    workdir = Path(tempfile.mkdtemp(prefix="closesync-cpu-"))
    try:
        result = measure(args.n, args.rounds, args.profile, workdir)
    finally:
        stop_embedded(workdir / "redis")
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "profile"}))
        return 0
    print(f"version: {result['version']}")
    print(
        f"{result['cpu_ms_per_run']:.2f} ms CPU per steady run; calls per run: Calendly "
        f"{result['calendly_calls_per_run']:.2f}, Close {result['close_calls_per_run']:.2f}"
    )
    if "profile" in result:
        print(result["profile"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
