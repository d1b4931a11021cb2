"""The sd_notify protocol by hand (stdlib only): readiness, status, watchdog pings and stopping to systemd.

systemd passes a unix datagram socket in $NOTIFY_SOCKET (a path, or an abstract name written with a
leading '@'); each message is one datagram of newline-separated `KEY=VALUE` assignments. Outside
systemd every call here is a no-op, so the daemon calls them unconditionally.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger("nimbus.systemd")


def _address(value: str) -> str:
    """$NOTIFY_SOCKET as a socket address: '@name' is the abstract name '\\0name'."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if not value.startswith("/"):
        raise OSError(f"unsupported NOTIFY_SOCKET {value!r} (need an absolute path or @name)")
    return value


def notify(*states: str) -> bool:
    """Send `states` (e.g. "READY=1", "STATUS=loading") to systemd as one datagram.

    Returns True when the datagram was sent; False when $NOTIFY_SOCKET is unset (not under a
    Type=notify unit: nothing is done) or when sending failed (logged, never raised: a daemon must
    not die because its supervisor went away). Newlines inside a state would split it into bogus
    assignments, so they are replaced by spaces.
    """
    target = os.environ.get("NOTIFY_SOCKET")
    if not target or not states:
        return False
    payload = "\n".join(state.replace("\n", " ") for state in states).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, _address(target))
    except OSError as exc:
        log.warning("sd_notify %s to %s failed: %s", ",".join(s.split("=", 1)[0] for s in states), target, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when no watchdog is asked of us.

    $WATCHDOG_PID, when set, names the process the watchdog is meant for; our children inherit the
    environment, so any other process (a local worker) gets None.
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


async def watchdog_loop(interval: float, healthy: Callable[[], bool] = lambda: True) -> None:
    """Ping WATCHDOG=1 every `interval` seconds while `healthy()` holds; runs until cancelled.

    The pings come from the event loop itself, so a loop stuck in blocking code stops them and
    systemd restarts the service after WatchdogSec. While `healthy()` is False (or raises) the pings
    are withheld: if it stays so for the whole timeout systemd restarts us; if it recovers sooner,
    the pings resume.
    """
    withheld = False  # logged once per change, not at every interval
    while True:
        try:
            ok, why = bool(healthy()), "unhealthy"
        except Exception as exc:
            ok, why = False, f"health check raised {exc!r}"
        if ok:
            if withheld:
                log.info("healthy again: watchdog pings resume")
            notify("WATCHDOG=1")
        elif not withheld:
            log.warning("%s: withholding watchdog pings", why)
        withheld = not ok
        await asyncio.sleep(interval)
