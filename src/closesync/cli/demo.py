"""`closesync demo`: the sandbox, a worker and a scheduler converging in a live table."""

from __future__ import annotations

import argparse
from typing import Any

from closesync.settings import load_settings


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser("demo", help="watch closesync converge against the sandbox")
    parser.add_argument("--seconds", type=float, default=75.0, help="stop after this long")
    parser.add_argument("--users", type=int, default=3, help="sandbox users (one connection each)")
    parser.add_argument("--seed", type=int, default=7, help="sandbox seed")
    parser.add_argument(
        "--change-every", type=float, default=9.0, help="seconds between two Calendly edits"
    )
    parser.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from closesync.cli.demo_runner import DemoOptions, run_demo

    settings = load_settings()
    options = DemoOptions(
        seconds=args.seconds,
        users=args.users,
        seed=args.seed,
        change_every=args.change_every,
        data_dir=f"{settings.data_dir}/demo",
    )
    return run_demo(options, settings.redis_url)
