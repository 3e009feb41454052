"""`closesync web` in production: the Flask app under gunicorn, started in-process.

gunicorn because it is the maintained pre-fork WSGI server: a master that keeps a bounded number
of worker processes alive (one crashing or stuck is replaced), each serving on a bounded pool of
threads (`gthread`: a request mostly waits on Redis or a token endpoint; `timed_worker` adds the
per-connection deadline gthread lacks), with a graceful timeout on SIGTERM and limits on the
request line and headers. Run through `gunicorn.app.base.BaseApplication`, so the one command
(`closesync web`, the Procfile's `web`) starts it with closesync's own settings; no gunicorn
config file or GUNICORN_CMD_ARGS is read.

Fork safety: the master resolves the Redis URL (starting the embedded Redis when REDIS_URL is
unset) and checks the settings before forking, and keeps no connection open across the fork;
each worker builds its own Services (Redis pool, HTTP sessions), logging and Sentry in `load`,
which gunicorn calls in the worker after the fork (the app is not preloaded).

Logging: every gunicorn line goes through the root handler `logs.configure` set up (JSON lines,
redaction), with any query string cut from its message (gunicorn names the request line of a
request it refuses). gunicorn's access log stays off: the app logs each request itself, path
only (`web/app.py`); its format is still set to a path-only one, should it be turned on.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gunicorn import glogging
from gunicorn.app.base import BaseApplication

from closesync.settings import Settings
from closesync.web.app import create_app
from closesync.web.timed_worker import StalledClientFilter, TimedThreadWorker
from closesync.web.webhooks import SyncAsker
from closesync.wiring.logs import configure
from closesync.wiring.metrics import pool_process_exited
from closesync.wiring.observability import init_sentry
from closesync.wiring.services import Services

# Seconds an idle keep-alive connection is kept (a browser's next redirect of the same flow
# reuses it); short, since each one holds a slot of a worker's poller.
KEEPALIVE_SECONDS = 5
# Longest request line, in bytes (gunicorn's default): an OAuth callback's code and state are a
# few hundred; longer gets 414 before the app sees it.
LIMIT_REQUEST_LINE = 4094
# Most header fields, and longest one, in bytes (gunicorn's defaults): a browser sends about a
# dozen; more or longer gets 431.
LIMIT_REQUEST_FIELDS = 100
LIMIT_REQUEST_FIELD_SIZE = 8190
# gunicorn's access-log format should it be turned on: the path (%(U)s), never the request line
# (%(r)s) or the query string (%(q)s), which carry codes and `state`.
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'
# The workers' heartbeat files: in memory where there is /dev/shm (a container's /tmp may be a
# slow overlay, which stalls heartbeats and gets healthy workers killed).
_SHM = "/dev/shm"  # noqa: S108 - a directory gunicorn writes its heartbeat files to, by design

_QUERY = re.compile(r"\?[^\s'\"]*")


# Builds, from a worker's Services, what webhook deliveries ask for syncs with.
AskerFactory = Callable[[Services], SyncAsker]


@dataclass(frozen=True)
class Serving:
    """Where and how wide `closesync web` serves."""

    host: str
    port: int
    workers: int
    threads: int


class _PathOnly(logging.Filter):
    """Cuts query strings out of a record's message (gunicorn quotes refused request lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cut = _QUERY.sub("", message)
        if cut != message:
            record.msg, record.args = cut, None
        return True


class GunicornLogs(glogging.Logger):
    """gunicorn's logger, handing every line to the root handler instead of its own."""

    def setup(self, cfg: Any) -> None:
        self.cfg = cfg
        self._access_log_enabled = False  # the app logs each request itself
        level = logging.getLevelNamesMapping().get(str(cfg.loglevel).upper(), logging.INFO)
        self.error_log.setLevel(level)
        for log in (self.error_log, self.access_log):
            log.propagate = True
            for kind in (StalledClientFilter, _PathOnly):
                if not any(isinstance(f, kind) for f in log.filters):
                    log.addFilter(kind())


class GunicornServer(BaseApplication):
    """gunicorn's master and workers serving `create_app` with closesync's settings."""

    def __init__(
        self, settings: Settings, serving: Serving, make_ask: AskerFactory | None = None
    ) -> None:
        self.settings = settings
        self.serving = serving
        self.make_ask = make_ask
        self.services: Services | None = None  # a worker's own, built in `load`
        super().__init__()

    def options(self) -> dict[str, Any]:
        s, serving = self.settings, self.serving
        return {
            "bind": [f"{serving.host}:{serving.port}"],
            "worker_class": TimedThreadWorker,  # gthread, with a deadline per connection
            "workers": serving.workers,
            "threads": serving.threads,
            "timeout": s.web_timeout_seconds,
            "graceful_timeout": s.web_graceful_timeout_seconds,
            "keepalive": KEEPALIVE_SECONDS,
            "limit_request_line": LIMIT_REQUEST_LINE,
            "limit_request_fields": LIMIT_REQUEST_FIELDS,
            "limit_request_field_size": LIMIT_REQUEST_FIELD_SIZE,
            "preload_app": False,  # Services are built in each worker, after the fork
            "accesslog": None,
            "access_log_format": ACCESS_LOG_FORMAT,
            "errorlog": "-",
            "loglevel": s.log_level.lower(),
            "logger_class": GunicornLogs,
            "proc_name": "closesync-web",
            # No control socket file in the working directory (gunicorn 24+): signals suffice.
            "control_socket_disable": True,
            "worker_tmp_dir": _SHM if os.path.isdir(_SHM) else None,
            "when_ready": self._when_ready,
            "worker_exit": self._worker_exit,
            "child_exit": self._child_exit,
        }

    def load_config(self) -> None:
        for name, value in self.options().items():
            if name in self.cfg.settings:  # an older gunicorn lacks the newest settings
                self.cfg.set(name, value)

    def load(self) -> Any:  # a Flask app: a WSGI callable, though not to the stubs' letter
        """In each worker, after the fork: its own logging, Sentry, Services and app."""
        configure(self.settings.log_level, self.settings.log_format)
        init_sentry(self.settings)
        self.services = Services.build(self.settings)
        ask = self.make_ask(self.services) if self.make_ask is not None else None
        return create_app(self.services, self.settings.public_base_url, ask)

    def _when_ready(self, arbiter: Any) -> None:
        host, port = arbiter.LISTENERS[0].sock.getsockname()[:2]
        sys.stderr.write(
            f"closesync web on {host}:{port}; users connect at "
            f"{self.settings.public_base_url}/connect ({self.serving.workers} workers x "
            f"{self.serving.threads} threads)\n"
        )
        sys.stderr.flush()

    def _child_exit(self, arbiter: Any, worker: Any) -> None:
        # In the master: a worker is gone, its live gauges with it (its counters stay summed).
        pool_process_exited(worker.pid)

    def _worker_exit(self, arbiter: Any, worker: Any) -> None:
        if self.services is not None:
            self.services.close()
            self.services.redis.close()


def serve(settings: Settings, serving: Serving, make_ask: AskerFactory | None = None) -> None:
    """Run gunicorn until it is stopped (SIGTERM: graceful, SIGINT/SIGQUIT: at once).

    `settings.redis_url` must already be resolved (no embedded Redis started per worker).
    `make_ask` builds, in each worker after the fork, what webhook deliveries ask syncs with.
    """
    GunicornServer(settings, serving, make_ask).run()
