"""The record of process groups swapd owns, and reaping what a killed swapd left.

Every engine runs in its own process group. `OwnedGroups` keeps `{stateDir}/engines.json`
up to date (pid, pgid, start time of the group leader) so that, if swapd itself is
SIGKILLed or crashes outside systemd's cgroup cleanup, the next swapd can stop the
engines it left behind (vLLM #55510: an orphaned EngineCore kept 104 GB) before it
starts new ones.

Identity is decided by pid *and* process start time, never by name: a pid can be reused,
and "python" or "vllm" names nothing. Start times are compared relative to boot
(create_time - boot_time), which a clock step (NTP after boot) does not move, and only
within the same boot (boot_id).

Kernel facts the matching relies on: a pid number stays reserved while any process still
uses it as its process-group id, so (1) if the recorded leader pid now belongs to a
process with another start time, our group has fully exited; (2) if the leader pid is
free but the pgid has members, they are members of the group we created (all of them
started after the leader did, since they joined its new session).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import psutil
import structlog

from swapd import procgroup
from swapd.files import write_atomic

log = structlog.get_logger("swapd.orphans")

FILE_NAME = "engines.json"
_VERSION = 1
# create_time has clock-tick resolution (10 ms); two processes with the same pid cannot
# start that close together (the pid space would have to wrap in between).
_TOLERANCE = 0.02


def is_same_process(recorded_start: float, actual_start: float) -> bool:
    """True when two start times (same clock) denote the same process."""
    return abs(recorded_start - actual_start) <= _TOLERANCE


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _since_boot(pid: int) -> float:
    """Start time of `pid` in seconds after boot; raises psutil.Error when it is gone."""
    return psutil.Process(pid).create_time() - psutil.boot_time()


def _write_atomic(path: Path, data: object) -> bool:
    """Replace `path` with JSON `data` atomically; False (logged) when that fails."""
    try:
        write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())
    except OSError as exc:
        # A read-only or full disk must not take the daemon down: the record is a safety
        # net for the next start, not something serving depends on.
        log.warning("cannot write engine record", path=str(path), error=str(exc))
        return False
    return True


class OwnedGroups:
    """The process groups this swapd started and has not yet seen gone."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self._records: dict[int, dict[str, Any]] = {}
        self._boot_id = _boot_id()
        self._me = os.getpid()
        self._me_start = psutil.Process(self._me).create_time()

    def records(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._records.values()]

    def add(self, model: str, pid: int, pgid: int) -> None:
        try:
            start = psutil.Process(pid).create_time()
            boot = psutil.boot_time()
        except psutil.Error as exc:
            # Exited before we could look at it: nothing is left to reap later.
            log.debug("engine gone before it was recorded", model=model, pid=pid, error=str(exc))
            return
        self._records[pid] = {
            "model": model,
            "pid": pid,
            "pgid": pgid,
            "start_time": start,
            "boot_time": boot,
            "boot_id": self._boot_id,
            "swapd_pid": self._me,
            "swapd_start_time": self._me_start,
        }
        self._write()

    def remove(self, pid: int) -> None:
        if self._records.pop(pid, None) is not None:
            self._write()

    def _write(self) -> None:
        _write_atomic(self.path, {"version": _VERSION, "groups": list(self._records.values())})


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot read engine record", path=str(path), error=str(exc))
        return []
    try:
        data = json.loads(text)
        groups = data["groups"]
        if not isinstance(groups, list):
            raise TypeError("groups is not a list")
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("engine record is corrupt, ignoring it", path=str(path), error=str(exc))
        return []
    return [g for g in groups if isinstance(g, dict)]


def _owner_alive(rec: dict[str, Any]) -> bool:
    """Is the swapd that wrote `rec` another swapd that is still running?"""
    pid, start = rec.get("swapd_pid"), rec.get("swapd_start_time")
    if not isinstance(pid, int) or not isinstance(start, int | float) or pid == os.getpid():
        return False
    try:
        return is_same_process(float(start), psutil.Process(pid).create_time())
    except psutil.Error:
        return False


def _classify(rec: dict[str, Any], boot_id: str | None) -> str:
    """'ours' (reap the group), 'owned' (a live swapd owns it: keep), or 'gone'."""
    model, pid, pgid = rec.get("model"), rec.get("pid"), rec.get("pgid")
    start, boot = rec.get("start_time"), rec.get("boot_time")
    if not (isinstance(pid, int) and isinstance(pgid, int) and isinstance(start, int | float)):
        log.warning("malformed engine record", record=rec)
        return "gone"
    if pid <= 1 or pgid <= 1:
        log.warning("refusing engine record for pid/pgid <= 1", record=rec)
        return "gone"
    recorded_boot_id = rec.get("boot_id")
    if recorded_boot_id and boot_id and recorded_boot_id != boot_id:
        return "gone"  # written before a reboot: nothing of it can be alive
    if _owner_alive(rec):
        log.warning(
            "engine record belongs to a running swapd, leaving it",
            model=model,
            pid=pid,
            owner=rec.get("swapd_pid"),
        )
        return "owned"
    since_boot = float(start) - (
        float(boot) if isinstance(boot, int | float) else psutil.boot_time()
    )
    try:
        if is_same_process(since_boot, _since_boot(pid)):
            return "ours"  # the leader itself is still running
        # The pid was reused, which the kernel allows only once our group is empty.
        log.info("engine pid now belongs to another process, not touching it", model=model, pid=pid)
        return "gone"
    except psutil.Error:
        pass
    # Leader gone: are there grandchildren left in its group (EngineCore, MPI ranks)?
    members = procgroup.group_members(pgid)
    if not members:
        return "gone"
    for member in members:
        try:
            younger = _since_boot(member) >= since_boot - _TOLERANCE
        except psutil.Error:
            continue  # exited meanwhile
        if not younger:
            log.warning(
                "process group has members older than its recorded leader, not ours",
                model=model,
                pgid=pgid,
                member=member,
            )
            return "gone"
    return "ours"


async def _reap(rec: dict[str, Any], grace: float) -> dict[str, Any]:
    pgid: int = rec["pgid"]
    log.warning(
        "stopping engine left by a previous swapd",
        model=rec.get("model"),
        pid=rec["pid"],
        pgid=pgid,
    )
    killed = await procgroup.terminate_group(pgid, grace)
    gone = not await asyncio.to_thread(procgroup.group_members, pgid)
    if not gone:
        log.error(
            "could not stop leftover engine (permissions?)", model=rec.get("model"), pgid=pgid
        )
    return {
        "model": rec.get("model"),
        "pid": rec["pid"],
        "pgid": pgid,
        "killed": killed,
        "gone": gone,
    }


async def reap_leftovers(state_dir: str | Path, grace: float = 10.0) -> list[dict[str, Any]]:
    """Stop the engine groups a previous swapd recorded and left running; clear the record.

    Returns one dict per group stopped: model, pid, pgid, killed (SIGKILL was needed), gone.
    Call before the first engine starts (a left-over GPU tenant breaks the one-tenant rule).
    """
    path = Path(state_dir) / FILE_NAME
    records = await asyncio.to_thread(_read, path)
    boot_id = _boot_id()
    verdicts = [await asyncio.to_thread(_classify, rec, boot_id) for rec in records]
    ours = [rec for rec, v in zip(records, verdicts, strict=True) if v == "ours"]
    kept = [rec for rec, v in zip(records, verdicts, strict=True) if v == "owned"]
    # Concurrently: the total wait is one grace period, not one per group.
    reaped = list(await asyncio.gather(*(_reap(rec, grace) for rec in ours)))
    if kept:
        await asyncio.to_thread(_write_atomic, path, {"version": _VERSION, "groups": kept})
    else:
        try:
            await asyncio.to_thread(path.unlink, True)
        except OSError as exc:
            log.warning("cannot clear engine record", path=str(path), error=str(exc))
    return reaped
