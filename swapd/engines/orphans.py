"""The record of engine trees swapd owns, and reaping what a killed swapd left.

Every engine is a process tree (`procgroup.Tree`). `OwnedGroups` keeps `{stateDir}/engines.json`
up to date (leader pid and start time, the SWAPD_ENGINE marker, the engine's cgroup, and the
members seen so far with their start times) so that, if swapd itself is SIGKILLed or crashes
outside systemd's cgroup cleanup, the next swapd can stop everything the engines left behind
(vLLM #55510: an orphaned EngineCore kept 104 GB) before it starts new ones: a daemonised
helper in a session of its own is found by its marker, by its cgroup, or by its recorded pid
with the same start time.

Identity is decided by pid *and* process start time (clock ticks since boot, exact), never
by name: a pid can be reused, and "python" or "vllm" names nothing. Only within the same
boot (boot_id). A pid number stays reserved while any process uses it as its process-group
id, so if the recorded leader pid now names a process with another start time, the group we
created is empty (its other marks are still searched).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from pathlib import Path
from typing import Any

import psutil
import structlog

from swapd.engines import procgroup
from swapd.files import read_state_json, write_atomic

log = structlog.get_logger("swapd.orphans")

FILE_NAME = "engines.json"
_VERSION = 2
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
    """The engine trees this swapd started and has not yet seen gone."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self._records: dict[int, dict[str, Any]] = {}
        self._trees: dict[int, procgroup.Tree] = {}
        self._boot_id = _boot_id()
        self._me = os.getpid()
        self._me_start = psutil.Process(self._me).create_time()

    def records(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._records.values()]

    def add(self, model: str, tree: procgroup.Tree) -> None:
        pid = tree.leader
        try:
            start = psutil.Process(pid).create_time()
            boot = psutil.boot_time()
        except psutil.Error as exc:
            # Exited before we could look at it: its marker still finds what it left.
            log.debug("engine gone before it was recorded", model=model, pid=pid, error=str(exc))
            start, boot = psutil.boot_time() + tree.start / procgroup.CLOCK_TICKS, None
        self._trees[pid] = tree
        self._records[pid] = {
            "model": model,
            "pid": pid,
            "pgid": tree.pgid,
            "start_time": start,
            "boot_time": boot,
            "start_ticks": tree.start,
            "marker": tree.marker,
            "cgroup": tree.cgroup,
            "members": [],
            "boot_id": self._boot_id,
            "swapd_pid": self._me,
            "swapd_start_time": self._me_start,
        }
        self._write()

    def remove(self, pid: int) -> None:
        self._trees.pop(pid, None)
        if self._records.pop(pid, None) is not None:
            self._write()

    @staticmethod
    def members_now(trees: dict[int, procgroup.Tree]) -> dict[int, list[list[int]]]:
        """leader pid -> [pid, start ticks] of each live member of its tree. Reads /proc
        only (run in a worker thread); `note_members` applies the result."""
        found = procgroup.engine_trees({str(pid): tree for pid, tree in trees.items()})
        return {
            int(key): sorted([p, t] for p in pids if (t := procgroup.start_ticks(p)) is not None)
            for key, pids in found.items()
        }

    def note_members(self, members: dict[int, list[list[int]]]) -> None:
        """Record the members each tree has now; written only when they changed.

        The marker and the cgroup find almost every leftover; this finds the rest: a
        member that cleared its environment and was re-parented to this swapd, after this
        swapd is SIGKILLed (its parent is then init, and nothing else points at it).
        """
        changed = False
        for pid, now in members.items():
            rec = self._records.get(pid)
            if rec is not None and now != rec["members"]:
                rec["members"] = now
                changed = True
        if changed:
            self._write()

    async def supervise(self, interval: float = 1.0) -> None:
        """Until cancelled: collect adopted orphans that died (swapd is their subreaper)
        and keep the members in the record current."""
        while True:
            await asyncio.sleep(interval)
            procgroup.reap_adopted()
            if self._trees:
                trees = dict(self._trees)
                self.note_members(await asyncio.to_thread(self.members_now, trees))

    def _write(self) -> None:
        _write_atomic(self.path, {"version": _VERSION, "groups": list(self._records.values())})


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        data = read_state_json(path)
    except OSError as exc:
        log.warning("cannot read engine record", path=str(path), error=str(exc))
        return []
    except ValueError as exc:
        log.warning("engine record is corrupt or not swapd's own, ignoring it", path=str(path),
                    error=str(exc))
        return []
    if data is None:
        return []
    try:
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


def _tree(rec: dict[str, Any]) -> procgroup.Tree | None:
    """The engine tree a record describes; None when the record is malformed."""
    pid, start, ticks = rec.get("pid"), rec.get("start_time"), rec.get("start_ticks")
    if not isinstance(pid, int) or pid <= 1:
        return None
    if not isinstance(ticks, int):
        # Version 1: a psutil start time (wall clock at boot + offset).
        boot = rec.get("boot_time")
        if not isinstance(start, int | float) or not math.isfinite(start):
            return None
        base = (float(boot) if isinstance(boot, int | float) and math.isfinite(boot)
                else psutil.boot_time())
        ticks = round((float(start) - base) * procgroup.CLOCK_TICKS)
    marker, cgroup = rec.get("marker"), rec.get("cgroup")
    members = rec.get("members")
    known = tuple(
        (m[0], m[1]) for m in (members if isinstance(members, list) else [])
        if isinstance(m, list) and len(m) == 2 and all(isinstance(x, int) for x in m) and m[0] > 1
    )
    return procgroup.Tree(
        leader=pid, start=ticks,
        marker=marker if isinstance(marker, str) and marker else None,
        cgroup=cgroup if isinstance(cgroup, str) and _is_cgroup_dir(cgroup) else None,
        known=known,
    )


def _is_cgroup_dir(path: str) -> bool:
    # A record is data from disk: only a cgroup below swapd's own (where swapd makes its
    # engines' cgroups) is ever killed or removed, never another service's.
    own = procgroup.own_cgroup()
    if own is None or ".." in path.split("/") or "\x00" in path:
        return False
    return os.path.normpath(path).startswith(os.path.normpath(own) + "/")


def _classify(rec: dict[str, Any], boot_id: str | None) -> str:
    """'ours' (reap the tree), 'owned' (a live swapd owns it: keep), or 'gone'."""
    model = rec.get("model")
    tree = _tree(rec)
    if tree is None:
        log.warning("malformed or unsafe engine record", record=rec)
        return "gone"
    recorded_boot_id = rec.get("boot_id")
    if recorded_boot_id and boot_id and recorded_boot_id != boot_id:
        return "gone"  # written before a reboot: nothing of it can be alive
    if _owner_alive(rec):
        log.warning(
            "engine record belongs to a running swapd, leaving it",
            model=model,
            pid=tree.leader,
            owner=rec.get("swapd_pid"),
        )
        return "owned"
    # Group members and marked processes younger than the leader, recorded members with
    # their exact start time, the cgroup's members, and all their descendants.
    return "ours" if procgroup.engine_tree(tree) else "gone"


async def _reap(rec: dict[str, Any], grace: float) -> dict[str, Any]:
    tree = _tree(rec)
    assert tree is not None
    members = await asyncio.to_thread(procgroup.engine_tree, tree)
    log.warning(
        "stopping engine left by a previous swapd",
        model=rec.get("model"),
        pid=tree.leader,
        pgid=tree.pgid,
        pids=members,
    )
    killed = await procgroup.terminate_tree(tree, grace)
    gone = not await asyncio.to_thread(procgroup.engine_tree, tree)
    if not gone:
        log.error(
            "could not stop leftover engine (permissions?)", model=rec.get("model"),
            pgid=tree.pgid,
        )
    procgroup.remove_cgroup(tree.cgroup)
    return {
        "model": rec.get("model"),
        "pid": tree.leader,
        "pgid": tree.pgid,
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
