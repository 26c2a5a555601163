"""Process-group primitives: the only code in swapd that sends signals.

An engine (vLLM, SGLang, trtllm-serve) is a tree of processes that share the
process group swapd created for it. Stopping means signalling the *group* and
confirming that no member is left (vLLM #55510: an EngineCore orphan kept 104 GB).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import psutil

# How often we look for surviving group members while waiting for them to exit.
# Exit is confirmed by polling because grandchildren are not our children: we
# get no SIGCHLD for them.
_POLL_INTERVAL = 0.02


def group_members(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes in process group `pgid`."""
    members: list[int] = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) != pgid:
                continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except (ProcessLookupError, psutil.Error, OSError):
            continue
        members.append(proc.pid)
    return members


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to every member of the group; False when the group is gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


async def wait_group_gone(pgid: int, timeout: float) -> bool:
    """Wait until no live member of `pgid` is left; True if that happened in time."""
    deadline = time.monotonic() + timeout
    while True:
        if not await asyncio.to_thread(group_members, pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL_INTERVAL)


async def terminate_group(pgid: int, grace: float) -> bool:
    """SIGTERM the group, SIGKILL whatever is left after `grace` seconds.

    Returns True when SIGKILL had to be sent. Returns only once no member of the
    group is left alive.
    """
    if not signal_group(pgid, signal.SIGTERM):
        return False
    if await wait_group_gone(pgid, grace):
        return False
    return await kill_group(pgid)


async def kill_group(pgid: int) -> bool:
    """SIGKILL the group and wait for it to be gone. True if anything was killed."""
    sent = signal_group(pgid, signal.SIGKILL)
    # SIGKILL cannot be ignored; a process stuck in uninterruptible sleep (D state,
    # e.g. a driver call) still leaves eventually. Keep confirming.
    while not await wait_group_gone(pgid, 5.0):
        with contextlib.suppress(Exception):
            signal_group(pgid, signal.SIGKILL)
    return sent
