"""In-process emulators of the Calendly and Close APIs, served over loopback HTTP.

Used by the tests, the `closesync sandbox` command and the demo: `Sandbox.start(config)`
binds both ports, seeds a deterministic World and serves until `stop()`. It must never be
imported by the sync code itself; only configuration (base URLs) points the clients at it.
"""

from closesync.sandbox.config import (
    CALENDLY_CLIENT_ID,
    CALENDLY_CLIENT_SECRET,
    CLOSE_CLIENT_ID,
    CLOSE_CLIENT_SECRET,
    SandboxConfig,
)
from closesync.sandbox.faults import FaultRule
from closesync.sandbox.records import SeededUser
from closesync.sandbox.server import PortInUseError, Sandbox
from closesync.sandbox.world import World

__all__ = [
    "CALENDLY_CLIENT_ID",
    "CALENDLY_CLIENT_SECRET",
    "CLOSE_CLIENT_ID",
    "CLOSE_CLIENT_SECRET",
    "FaultRule",
    "PortInUseError",
    "Sandbox",
    "SandboxConfig",
    "SeededUser",
    "World",
]
