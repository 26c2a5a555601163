"""Every descendant of an engine dies with it, wherever it moved (issue 11, item 2).

Real swapd, real fake engines that leave descendants outside their process group: one in a
group of its own (setpgid), a double-forked daemon (setsid), and a daemon exec'd with an
empty environment (no marker: found through swapd's subreaper role only). After unload, a
swap, a crash of the engine's leader, swapd's SIGTERM, and a SIGKILL of swapd followed by
the next swapd's start, none of them may be left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from swapd.engines import procgroup
from tests.support import (
    IDLE,
    PY,
    Swapd,
    fake_cmd,
    free_port,
    model,
    port_block,
    read_records,
    wait_healthy,
    wait_until,
    write_config,
)

CHAT = "/v1/chat/completions"
ESCAPES = ("--escape", "setpgid", "--escape", "setsid", "--escape", "setsid-noenv")


def chat(daemon: Swapd, name: str) -> dict[str, Any]:
    code, doc = daemon.post(CHAT, {"model": name, "messages": [{"role": "user", "content": "hi"}]})
    assert code == 200, doc
    return doc  # type: ignore[no-any-return]


class Procs:
    """Processes identified by pid and start time: a reused pid is not mistaken for them."""

    def __init__(self, pids: list[int]) -> None:
        self.ids = {p: procgroup.start_ticks(p) for p in pids}
        assert all(t is not None for t in self.ids.values()), f"not all alive: {self.ids}"

    def alive(self) -> list[int]:
        out = []
        for pid, start in self.ids.items():
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE and procgroup.start_ticks(pid) == start:
                    out.append(pid)
            except psutil.Error:
                pass
        return out


def engine_procs(rec: Path, name: str, index: int = -1) -> Procs:
    """The leader and the escapees of the `index`-th start of engine `name`."""
    events = [e for e in read_records(rec) if e["model"] == name]
    starts = [i for i, e in enumerate(events) if e["event"] == "start"]
    first = starts[index]
    last = starts[index + 1] if index != -1 and index + 1 < len(starts) else len(events)
    mine = events[first:last]
    escapees = [e["child"] for e in mine if e["event"] == "escapee"]
    assert len(escapees) == 3, mine
    return Procs([mine[0]["pid"], *escapees])


def tree_model(rec: Path, name: str, *flags: str) -> dict[str, Any]:
    return model(fake_cmd(*ESCAPES, *flags, record=rec, name=name), unloadTimeout=2)


def test_descendants_die_on_unload_and_swap(start_swapd: Any, tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    daemon = start_swapd({"models": {"a": tree_model(rec, "a"), "b": tree_model(rec, "b")}})
    chat(daemon, "a")
    procs = engine_procs(rec, "a")
    assert procs.alive() == list(procs.ids)
    leader, setpgid, setsid, noenv = procs.ids
    assert os.getpgid(setpgid) == setpgid != leader
    assert os.getsid(setsid) not in (leader, setsid) and os.getsid(noenv) not in (leader, noenv)
    # The daemons were orphaned at once and re-parented to swapd, the subreaper.
    wait_until(lambda: psutil.Process(noenv).ppid() == daemon.proc.pid, timeout=5,
               message="the orphan re-parented to swapd")
    assert procgroup.read_marker(noenv) is None
    assert (procgroup.read_marker(setsid) or "").split(":")[1] == "a"

    code, _ = daemon.get("/unload")
    assert code == 200
    assert procs.alive() == [], "unload returned with descendants left"

    chat(daemon, "a")
    again = engine_procs(rec, "a")
    chat(daemon, "b")  # a swap: a's whole tree is gone before b starts
    assert again.alive() == []
    assert daemon.status()["models"]["a"]["state"] == "stopped"
    # The killed orphans were swapd's children: it collects them (no zombie left).
    wait_until(lambda: not zombies(daemon.proc.pid), timeout=10,
               message="swapd reaped its adopted orphans")


def zombies(pid: int) -> list[int]:
    """The zombie children of `pid` now."""
    out = []
    for child in psutil.Process(pid).children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                out.append(child.pid)
        except psutil.NoSuchProcess:
            pass  # reaped between the listing and the look: what the caller waits for
    return out


def test_descendants_that_ignore_sigterm_get_sigkill(start_swapd: Any, tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    entry = tree_model(rec, "s", "--ignore-sigterm")
    daemon = start_swapd({"models": {"s": {**entry, "unloadTimeout": 0.3}}})
    chat(daemon, "s")
    procs = engine_procs(rec, "s")
    assert daemon.get("/unload")[0] == 200
    assert procs.alive() == []
    assert "engine outlived its grace: SIGKILL" in daemon.log()


def test_descendants_die_when_the_leader_crashes(start_swapd: Any, tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    daemon = start_swapd({"models": {"c": tree_model(rec, "c", "--crash-after", "1")}})
    chat(daemon, "c")  # the leader exits right after answering
    procs = engine_procs(rec, "c")
    wait_until(lambda: not procs.alive(), timeout=15, message="the crashed engine's tree gone")


def test_descendants_die_on_swapd_sigterm(start_swapd: Any, tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    daemon = start_swapd({"models": {"a": tree_model(rec, "a")}})
    chat(daemon, "a")
    procs = engine_procs(rec, "a")
    assert daemon.stop() == 0
    assert procs.alive() == []


def recorded_members(state: Path) -> set[int]:
    try:
        data = json.loads((state / "engines.json").read_text())
    except (OSError, ValueError):
        return set()
    return {m[0] for g in data["groups"] for m in g.get("members", [])}


def test_next_swapd_reaps_descendants_after_a_sigkill(start_swapd: Any, tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    config = {"models": {"a": tree_model(rec, "a")}}
    first = start_swapd(config)
    chat(first, "a")
    procs = engine_procs(rec, "a")
    # The record names every member with its start time: the unmarked orphan too.
    wait_until(lambda: set(procs.ids) <= recorded_members(first.state_dir), timeout=10,
               message="the members in the record")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    assert procs.alive() == list(procs.ids)  # what a SIGKILLed supervisor leaves behind

    second = start_swapd(config, port=first.port, state_dir=first.state_dir)
    assert procs.alive() == [], second.log()  # reaped before the second one listened
    assert "stopping engine left by a previous swapd" in second.log()


# -- a cgroup per engine, where swapd's cgroup is delegated ------------------------------------


@pytest.fixture
def delegated_cgroup() -> Iterator[str]:
    """A cgroup v2 directory we may create, standing for systemd's `Delegate=yes`."""
    mount = procgroup._cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup v2 file system")
    own = Path("/proc/self/cgroup").read_text().splitlines()
    path = next((line[3:] for line in own if line.startswith("0::")), None)
    if path is None or mount[1] != "/":
        pytest.skip("cgroup v2 not usable here")
    parent = os.path.join(mount[0], path.lstrip("/"), f"swapd-test-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(parent)
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup: {exc}")
    try:
        yield parent
    finally:
        for sub in Path(parent).iterdir():
            if sub.is_dir():
                sub.rmdir()
        os.rmdir(parent)


def start_in_cgroup(tmp_path: Path, config: dict[str, Any], cgroup: str, port: int,
                    n: int) -> Swapd:
    state = tmp_path / "state"
    config = {"stateDir": str(state), "startPort": port_block(), "listen": f"127.0.0.1:{port}",
              **config}
    path = write_config(tmp_path, config)
    log_path = tmp_path / f"swapd-cg-{n}.log"
    procs_file = os.open(os.path.join(cgroup, "cgroup.procs"), os.O_WRONLY)

    def enter() -> None:
        os.write(procs_file, b"0")

    try:
        proc = subprocess.Popen([PY, "-m", "swapd", "serve", "--config", str(path)],
                                stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                cwd=str(tmp_path), preexec_fn=enter)
    finally:
        os.close(procs_file)
    daemon = Swapd(path, port, proc, log_path, state)
    wait_healthy(daemon)
    return daemon


def test_engine_cgroup_is_killed_and_removed(tmp_path: Path, delegated_cgroup: str) -> None:
    rec = tmp_path / "rec.jsonl"
    config = {"models": {"a": tree_model(rec, "a")}}
    port = free_port()
    daemons = [start_in_cgroup(tmp_path, config, delegated_cgroup, port, 0)]
    try:
        first = daemons[0]
        chat(first, "a")
        procs = engine_procs(rec, "a")
        leader = next(iter(procs.ids))
        engine_cg = Path(f"/proc/{leader}/cgroup").read_text().strip().rsplit("/", 1)[-1]
        assert engine_cg.startswith("engine-a-"), engine_cg
        members = procgroup.cgroup_members(os.path.join(delegated_cgroup, engine_cg))
        assert set(procs.ids) <= set(members)  # every escapee stayed in the engine's cgroup

        assert first.get("/unload")[0] == 200
        assert procs.alive() == []
        assert not os.path.exists(os.path.join(delegated_cgroup, engine_cg))

        # SIGKILL: the next swapd kills the recorded cgroup and removes it.
        chat(first, "a")
        again = engine_procs(rec, "a")
        cg_dirs = [p for p in Path(delegated_cgroup).iterdir() if p.is_dir()]
        assert len(cg_dirs) == 1
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        assert again.alive() == list(again.ids)
        daemons.append(start_in_cgroup(tmp_path, config, delegated_cgroup, port, 1))
        assert again.alive() == []
        assert not cg_dirs[0].exists()
    finally:
        for daemon in daemons:
            daemon.stop()


def test_adopted_orphans_go_to_the_engine_that_marked_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """As subreaper, swapd adopts the orphans of every engine. One that kept its marker
    belongs to that engine only; one without (it cleared its environment) to the newest
    engine that started before it."""
    monkeypatch.setattr(procgroup, "_subreaper", True)  # our children count as adopted
    now = procgroup.ticks_now()
    older = procgroup.Tree(leader=0x7FFFFFF0, start=now - 20, marker="t:older:1")
    newer = procgroup.Tree(leader=0x7FFFFFF1, start=now - 10, marker="t:newer:2")
    sleeper = [PY, "-c", IDLE]
    env = {k: v for k, v in os.environ.items() if k != procgroup.MARKER_VAR}
    procgroup.track(older)
    procgroup.track(newer)
    marked = subprocess.Popen(sleeper, env={**env, procgroup.MARKER_VAR: older.marker or ""})
    unmarked = subprocess.Popen(sleeper, env=env)
    try:
        wait_until(lambda: procgroup.read_marker(marked.pid) == older.marker, timeout=5,
                   message="the child exec'd")
        trees = procgroup.engine_trees({"older": older, "newer": newer})
        assert marked.pid in trees["older"] and marked.pid not in trees["newer"]
        assert unmarked.pid in trees["newer"] and unmarked.pid not in trees["older"]
        # Asked about alone, the newer engine still does not take the older one's orphan.
        assert marked.pid not in procgroup.engine_tree(newer)
    finally:
        procgroup.untrack(older)
        procgroup.untrack(newer)
        for proc in (marked, unmarked):
            proc.kill()
            proc.wait()
