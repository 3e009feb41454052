"""gunicorn's gthread worker with a deadline on every read and write of a request.

gthread hands a connection to a thread once its first bytes arrive and then reads the rest of
the request on a blocking socket without any timeout: a client sending half a request (and
nothing more) holds that thread for good, and WEB_THREADS such clients stall a worker. Here
each connection's socket times out after WEB_TIMEOUT_SECONDS (gunicorn's `timeout`), as the
old stdlib server's did, so a stalled client is dropped and its thread freed; the drop is
logged as one INFO line (`StalledClientFilter`), not as an error with a traceback a slow
client could flood the log and Sentry with.
"""

from __future__ import annotations

import logging

from gunicorn.workers.gthread import TConn, ThreadWorker


class _TimedConn(TConn):
    def init(self) -> None:
        # Runs in the worker thread before each request is read, after gunicorn has made the
        # socket blocking (a timeout of None); a timeout keeps it blocking, with a deadline.
        super().init()
        self.sock.settimeout(self.cfg.timeout)


class TimedThreadWorker(ThreadWorker):
    """ThreadWorker whose connections time out after WEB_TIMEOUT_SECONDS of silence."""

    def enqueue_req(self, conn: TConn) -> None:
        conn.__class__ = _TimedConn  # the same connection, with the deadline applied in init
        super().enqueue_req(conn)


class StalledClientFilter(logging.Filter):
    """gunicorn.error's 'Socket error' for a client that timed out, as one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, TimeoutError) and record.levelno >= logging.ERROR:
            record.msg, record.args, record.exc_info, record.exc_text = (
                "dropped a client that stalled mid-request (WEB_TIMEOUT_SECONDS)",
                None,
                None,
                None,
            )
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True
