"""Owned process groups on disk, and reaping them with real processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from structlog.testing import capture_logs

from swapd.engines import orphans, procgroup
from swapd.engines.orphans import OwnedGroups, is_same_process, reap_leftovers
from tests.support import IDLE, wait_until

# Ignores SIGTERM, and says so only once the handler is in place.
STUBBORN = (
    "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); signal.alarm(120); signal.pause()"
)
# Starts a grandchild in its own group, reports its pid, and exits when stdin closes.
LEADER = (
    "import subprocess, sys; "
    f"c = subprocess.Popen([sys.executable, '-c', {IDLE!r}], stdout=subprocess.DEVNULL); "
    "print(c.pid, flush=True); sys.stdin.readline()"
)


class Spawner:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def __call__(self, code: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            start_new_session=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group, grandchildren too
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            proc.wait(timeout=10)


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    spawner = Spawner()
    try:
        yield spawner
    finally:
        spawner.cleanup()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def tree(pid: int) -> procgroup.Tree:
    return procgroup.Tree(leader=pid, start=procgroup.start_ticks(pid) or procgroup.ticks_now())


def load(state: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((state / orphans.FILE_NAME).read_text())
    return data


def edit_records(state: Path, shift_start: float = 0.0, **values: Any) -> None:
    """Rewrite the recorded groups: move start_time by `shift_start`, set `values`."""
    data = load(state)
    for rec in data["groups"]:
        rec["start_time"] += shift_start
        rec["start_ticks"] += round(shift_start * procgroup.CLOCK_TICKS)
        rec.update(values)
    (state / orphans.FILE_NAME).write_text(json.dumps(data))


def test_is_same_process() -> None:
    assert is_same_process(1000.0, 1000.0)
    assert is_same_process(1000.0, 1000.01)
    assert not is_same_process(1000.0, 1000.5)
    assert not is_same_process(1000.0, 999.0)


def test_records_are_written_atomically(tmp_path: Path, spawn: Spawner) -> None:
    state = tmp_path / "state"  # created on first write
    owned = OwnedGroups(state)
    a, b = spawn(IDLE), spawn(IDLE)
    owned.add("alpha", tree(a.pid))
    data = load(state)
    assert data["version"] == 2
    [rec] = data["groups"]
    assert rec["model"] == "alpha" and rec["pid"] == a.pid and rec["pgid"] == a.pid
    assert rec["swapd_pid"] == os.getpid()
    assert is_same_process(rec["start_time"], psutil.Process(a.pid).create_time())
    owned.add("beta", tree(b.pid))
    assert [r["model"] for r in load(state)["groups"]] == ["alpha", "beta"]
    owned.remove(a.pid)
    assert [r["model"] for r in load(state)["groups"]] == ["beta"]
    owned.remove(a.pid)  # unknown: no-op
    owned.remove(b.pid)
    assert load(state)["groups"] == []
    assert [p.name for p in state.iterdir()] == [orphans.FILE_NAME]  # no temp files left


def test_failed_write_keeps_previous_record(
    tmp_path: Path, spawn: Spawner, monkeypatch: pytest.MonkeyPatch
) -> None:
    owned = OwnedGroups(tmp_path)
    a, b = spawn(IDLE), spawn(IDLE)
    owned.add("alpha", tree(a.pid))

    def full_disk(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with capture_logs() as logs:
        owned.add("beta", tree(b.pid))  # must not raise
    assert any(e["event"] == "cannot write engine record" for e in logs)
    assert [r["model"] for r in load(tmp_path)["groups"]] == ["alpha"]
    assert [p.name for p in tmp_path.iterdir()] == [orphans.FILE_NAME]


def test_unwritable_state_dir_does_not_raise(tmp_path: Path, spawn: Spawner) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    owned = OwnedGroups(blocker / "state")  # mkdir fails even for root
    proc = spawn(IDLE)
    with capture_logs() as logs:
        owned.add("alpha", tree(proc.pid))  # must not raise
    # The failure is said once, and the group is still tracked in memory.
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "cannot write engine record"
    ]
    assert [r["pid"] for r in owned.records()] == [proc.pid]
    owned.remove(proc.pid)
    assert owned.records() == []
    assert blocker.read_text() == ""  # nothing written over the file in the way


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_state_dir_does_not_raise(tmp_path: Path, spawn: Spawner) -> None:
    state = tmp_path / "ro"
    state.mkdir()
    state.chmod(0o500)
    try:
        owned = OwnedGroups(state)
        proc = spawn(IDLE)
        with capture_logs() as logs:
            owned.add("alpha", tree(proc.pid))  # must not raise
        assert any(e["event"] == "cannot write engine record" for e in logs)
        assert [r["pid"] for r in owned.records()] == [proc.pid]
        assert list(state.iterdir()) == []
        owned.remove(proc.pid)
        assert owned.records() == []
    finally:
        state.chmod(0o700)


async def test_add_of_a_process_already_gone_reaps_nothing(tmp_path: Path, spawn: Spawner) -> None:
    proc = spawn("pass")
    proc.wait(timeout=10)
    owned = OwnedGroups(tmp_path)
    owned.add("alpha", procgroup.Tree(proc.pid, procgroup.ticks_now(), marker="x:alpha:1"))
    assert [r["model"] for r in owned.records()] == ["alpha"]  # its marker may find leftovers
    assert await reap_leftovers(tmp_path, grace=0.2) == []
    assert not (tmp_path / orphans.FILE_NAME).exists()


async def test_reaps_left_over_groups(tmp_path: Path, spawn: Spawner) -> None:
    a, b = spawn(IDLE), spawn(IDLE)
    owned = OwnedGroups(tmp_path)
    owned.add("alpha", tree(a.pid))
    owned.add("beta", tree(b.pid))
    del owned  # the swapd that wrote the record is gone; a fresh one reaps

    reaped = await reap_leftovers(tmp_path, grace=5.0)

    assert sorted((r["model"], r["pid"], r["pgid"]) for r in reaped) == [
        ("alpha", a.pid, a.pid),
        ("beta", b.pid, b.pid),
    ]
    assert all(r["killed"] is False and r["gone"] is True for r in reaped)
    assert a.wait(timeout=10) == -signal.SIGTERM
    assert b.wait(timeout=10) == -signal.SIGTERM
    assert not (tmp_path / orphans.FILE_NAME).exists()


async def test_reaps_grandchildren_after_the_leader_exited(tmp_path: Path, spawn: Spawner) -> None:
    leader = spawn(LEADER)
    assert leader.stdout is not None and leader.stdin is not None
    grandchild = int(leader.stdout.readline())
    OwnedGroups(tmp_path).add("vllm", tree(leader.pid))
    leader.stdin.close()
    assert leader.wait(timeout=10) == 0  # leader gone (and reaped): only the grandchild is left
    assert os.getpgid(grandchild) == leader.pid

    reaped = await reap_leftovers(tmp_path, grace=5.0)

    assert [(r["model"], r["pgid"], r["gone"]) for r in reaped] == [("vllm", leader.pid, True)]
    wait_until(lambda: gone(grandchild), message="grandchild reaped")


async def test_sigkill_when_sigterm_is_ignored(tmp_path: Path, spawn: Spawner) -> None:
    proc = spawn(STUBBORN)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    OwnedGroups(tmp_path).add("stubborn", tree(proc.pid))

    reaped = await reap_leftovers(tmp_path, grace=0.2)

    assert [(r["model"], r["killed"], r["gone"]) for r in reaped] == [("stubborn", True, True)]
    assert proc.wait(timeout=10) == -signal.SIGKILL


async def test_reused_pid_is_not_killed(tmp_path: Path, spawn: Spawner) -> None:
    # The pid is alive, but with another start time: a different process got the pid.
    proc = spawn(IDLE)
    OwnedGroups(tmp_path).add("alpha", tree(proc.pid))
    edit_records(tmp_path, shift_start=-1000.0)

    assert await reap_leftovers(tmp_path, grace=0.2) == []

    assert proc.poll() is None
    assert not (tmp_path / orphans.FILE_NAME).exists()  # the record is cleared anyway


async def test_group_older_than_its_record_is_not_killed(tmp_path: Path, spawn: Spawner) -> None:
    # Leader gone, members left, but they started before the recorded leader did: not ours.
    leader = spawn(LEADER)
    assert leader.stdout is not None and leader.stdin is not None
    grandchild = int(leader.stdout.readline())
    OwnedGroups(tmp_path).add("alpha", tree(leader.pid))
    edit_records(tmp_path, shift_start=1000.0)
    leader.stdin.close()
    leader.wait(timeout=10)

    assert await reap_leftovers(tmp_path, grace=0.2) == []

    assert not gone(grandchild)


async def test_record_from_another_boot_is_ignored(tmp_path: Path, spawn: Spawner) -> None:
    proc = spawn(IDLE)
    OwnedGroups(tmp_path).add("alpha", tree(proc.pid))
    edit_records(tmp_path, boot_id="00000000-0000-0000-0000-000000000000")

    assert await reap_leftovers(tmp_path, grace=0.2) == []
    assert proc.poll() is None


async def test_groups_of_a_running_swapd_are_left_alone(tmp_path: Path, spawn: Spawner) -> None:
    other_swapd, engine = spawn(IDLE), spawn(IDLE)
    OwnedGroups(tmp_path).add("alpha", tree(engine.pid))
    edit_records(
        tmp_path,
        swapd_pid=other_swapd.pid,
        swapd_start_time=psutil.Process(other_swapd.pid).create_time(),
    )

    assert await reap_leftovers(tmp_path, grace=0.2) == []

    assert engine.poll() is None
    assert [r["pid"] for r in load(tmp_path)["groups"]] == [engine.pid]  # still recorded


async def test_missing_or_corrupt_record(tmp_path: Path) -> None:
    assert await reap_leftovers(tmp_path) == []
    assert await reap_leftovers(tmp_path / "does-not-exist") == []
    for text in ("{not json", '{"groups": 3}', "[]", json.dumps({"groups": [{"pid": "x"}]})):
        (tmp_path / orphans.FILE_NAME).write_text(text)
        with capture_logs() as logs:
            assert await reap_leftovers(tmp_path) == []
        assert any(e["log_level"] == "warning" for e in logs), text
        assert not (tmp_path / orphans.FILE_NAME).exists()


async def test_refuses_pid_one(tmp_path: Path) -> None:
    record = {"model": "x", "pid": 1, "pgid": 1, "start_time": psutil.boot_time()}
    (tmp_path / orphans.FILE_NAME).write_text(json.dumps({"version": 1, "groups": [record]}))
    assert await reap_leftovers(tmp_path) == []
