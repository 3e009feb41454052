"""The delivery threads' HTTP sessions: every socket they open is tracked, so that stop() can
cut an attempt in flight and no thread can open a connection after it, and counted, so that
an attempt can tell a reused kept-alive connection from a new one.

Kept apart from deliveries.py (the queue and its threads) because it is urllib3 plumbing:
connection classes that report their sockets. Never logs or keeps a URL or a key.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import weakref

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool


class SocketRegistry:
    """The delivery threads' sockets, so that stop() can shut down one blocked in an attempt
    (a read may otherwise wait out its full timeout); once closed it refuses new ones, so no
    thread can open a connection after stop() cut the others."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._closed = False

    def add(self, sock: socket.socket) -> None:
        """Track a newly connected socket; after close_all() close it and refuse."""
        with self._lock:
            if not self._closed:
                self._sockets.add(sock)
                return
        with contextlib.suppress(OSError):
            sock.close()
        raise ConnectionRefusedError("the sandbox's webhook deliverer is stopping")

    def close_all(self) -> None:
        """Shut down every tracked socket and refuse any later one."""
        with self._lock:
            self._closed = True
            # Copied under the lock: a WeakSet changed by another thread while iterated raises.
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):  # closed already
                sock.shutdown(socket.SHUT_RDWR)


class Connects:
    """How many connections one delivery thread's session has opened (thread-confined): an
    attempt that opened none reused a kept-alive one."""

    def __init__(self) -> None:
        self.count = 0


def tracking_session(registry: SocketRegistry, connects: Connects) -> requests.Session:
    """A requests session whose every socket lands in `registry` and is counted in
    `connects`."""

    class Connection(HTTPConnection):
        def connect(self) -> None:
            super().connect()
            connects.count += 1
            registry.add(self.sock)

    class SecureConnection(HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            connects.count += 1
            registry.add(self.sock)

    class Pool(HTTPConnectionPool):
        ConnectionCls = Connection

    class SecurePool(HTTPSConnectionPool):
        ConnectionCls = SecureConnection

    adapter = HTTPAdapter(max_retries=0)
    adapter.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": SecurePool}
    session = requests.Session()
    session.trust_env = False  # a proxy from the environment must not reroute loopback
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
