"""sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET (see sd_notify(3)).

Outside systemd (a terminal, tests, CI) NOTIFY_SOCKET is unset and every call is a
cheap no-op returning False. A failed send never raises: the daemon must not stop
serving because the notification channel is gone.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("swapd.systemd")

# What systemd hands to swapd and engines must not inherit. An engine that sees
# NOTIFY_SOCKET could send READY=1/STOPPING=1 on swapd's behalf (NotifyAccess=main
# drops those, but vLLM's launcher and others do call sd_notify); WATCHDOG_* would
# make a child ping a watchdog that is not its own; LISTEN_* describe sockets passed
# to swapd only. INVOCATION_ID and JOURNAL_STREAM stay: they identify the unit run
# and are harmless (an engine's stderr is our pipe, so JOURNAL_STREAM never matches).
SYSTEMD_ENV_VARS = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)

_failure_logged = False


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `message` ("READY=1", "STATUS=...", several lines allowed); True if sent."""
    global _failure_logged
    addr = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Non-blocking: this runs on the event loop, and a full receive queue
            # must cost one lost datagram, never a stalled loop.
            sock.setblocking(False)
            sock.sendto(message.encode(), addr)
    except OSError as exc:
        if not _failure_logged:
            _failure_logged = True
            log.debug("sd_notify failed", socket=addr, error=str(exc))
        return False
    return True


def ready(status: str | None = None) -> bool:
    """READY=1, with an optional STATUS= in the same datagram."""
    return notify("READY=1" if status is None else f"READY=1\nSTATUS={status}")


def stopping() -> bool:
    return notify("STOPPING=1")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when off."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
        pid = env.get("WATCHDOG_PID")
        if pid is not None and int(pid) != os.getpid():
            return None  # meant for another process (we were forked or exec'd)
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


async def watchdog_loop(interval: float, environ: Mapping[str, str] | None = None) -> None:
    """Ping the watchdog from the event loop until cancelled: a stuck loop stops the pings."""
    while True:
        notify("WATCHDOG=1", environ)
        await asyncio.sleep(interval)
