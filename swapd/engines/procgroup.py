"""Process trees: the only code in swapd that looks at pids and sends signals.

An engine (vLLM, SGLang, trtllm-serve) is a tree of processes. Its members do not stay in
the process group swapd created: a worker may call `setpgid`, or double-fork and `setsid`
(a daemonising helper), and a leftover vLLM worker holds 100 GB. So an engine's tree is
found by four independent marks, any one of which is enough:

1. its process group (the leader's pgid), as before;
2. an environment marker `SWAPD_ENGINE=<instance>:<model>:<nonce>` that every descendant
   inherits and /proc/<pid>/environ shows, wherever it moved (Jenkins' ProcessTreeKiller);
3. parenthood: swapd is a child subreaper (`PR_SET_CHILD_SUBREAPER`, as tini and
   containerd-shim), so an orphaned descendant is re-parented to swapd, not to init, and
   stays reachable by ppid even when it cleared its environment;
4. a cgroup v2 per engine when swapd runs in a cgroup it may write to (systemd
   `Delegate=yes`): membership there cannot be left without privileges, and
   `cgroup.kill` kills all of it at once.

Every candidate must also have started no earlier than the engine's leader (start times
in clock ticks since boot, exact), so a reused pid never matches. A stop is done only when
no member of the tree is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from swapd.engines import sockdiag

log = structlog.get_logger("swapd.procgroup")

MARKER_VAR = "SWAPD_ENGINE"
# One per swapd process: markers of two swapd instances never collide, and a marker
# cannot be guessed by a process that did not inherit it.
INSTANCE_ID = secrets.token_hex(6)

_PR_SET_CHILD_SUBREAPER = 36
# Polling bounds while waiting for a tree to be gone. Exit is confirmed by polling because
# most members are not our children: we get no SIGCHLD for them.
_POLL_MIN = 0.02
_POLL_MAX = 0.05
# An unregistered zombie child is reaped only once it has been seen twice this far apart:
# asyncio's child watcher collects the engines it spawned at once, never that late.
_ADOPTED_ZOMBIE_AGE = 0.5
# Start times converted from another clock (records of older versions) may be a tick off.
_TICK_SLACK = 2
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Tree:
    """What identifies one engine's processes, wherever they moved.

    `leader` is the process swapd spawned (a session and group leader, so its pid is the
    group's pgid); `start` its start time in clock ticks since boot (exact, so a reused
    pid is never taken for it); `marker` the value of SWAPD_ENGINE its descendants
    inherit; `cgroup` the absolute path of its cgroup v2 directory, when it has one.
    """

    leader: int
    start: int
    marker: str | None = None
    cgroup: str | None = None
    # (pid, start) of members seen earlier: how the next swapd finds, after a SIGKILL of
    # this one, a member that left group, environment and parenthood all at once.
    known: tuple[tuple[int, int], ...] = ()

    @property
    def pgid(self) -> int:
        return self.leader


@dataclass(frozen=True)
class _Proc:
    ppid: int
    pgid: int
    start: int
    zombie: bool


def new_marker(model: str) -> str:
    """A fresh SWAPD_ENGINE value for one spawn of `model`."""
    return f"{INSTANCE_ID}:{model}:{secrets.token_hex(8)}"


# -- /proc ---------------------------------------------------------------------------------


def _read_proc(path: str, size: int) -> bytes:
    """A /proc file in one read: open, read, close, and none of the fstat, isatty and lseek
    calls of a Python file object (a scan reads one per process, each a GIL release the
    serving thread pays for)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def _stat(pid: int) -> _Proc | None:
    try:
        raw = _read_proc(f"/proc/{pid}/stat", 4096)
    except OSError:
        return None
    # comm may contain spaces and parentheses: the fields start after the last ')'.
    fields = raw[raw.rfind(b")") + 2:].split()
    try:
        return _Proc(
            ppid=int(fields[1]), pgid=int(fields[2]), start=int(fields[19]),
            zombie=fields[0] in (b"Z", b"X"),
        )
    except (IndexError, ValueError):
        return None


def start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot; None when it is gone."""
    proc = _stat(pid)
    return None if proc is None else proc.start


def _snapshot() -> dict[int, _Proc]:
    procs: dict[int, _Proc] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return procs
    for name in names:
        if name.isdigit():
            proc = _stat(int(name))
            if proc is not None:
                procs[int(name)] = proc
    return procs


def read_marker(pid: int) -> str | None:
    """The SWAPD_ENGINE value in `pid`'s environment (as exec'd), or None."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return None  # gone, a zombie, or another user's process
    key = MARKER_VAR.encode() + b"="
    for entry in raw.split(b"\0"):
        if entry.startswith(key):
            return entry[len(key):].decode("utf-8", "replace")
    return None


def cgroup_members(path: str | None) -> list[int]:
    if not path:
        return []
    try:
        text = Path(path, "cgroup.procs").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


# -- who belongs to which tree -------------------------------------------------------------

# Trees this swapd spawned and has not seen gone, and the other children it spawned
# (cmdStop): only those are *not* adopted orphans. Guarded: the GPU sampler's thread reads.
_lock = threading.Lock()
_live: dict[int, Tree] = {}
_direct: set[int] = set()


def track(tree: Tree) -> None:
    with _lock:
        _live[tree.leader] = tree
        _direct.add(tree.leader)


def untrack(tree: Tree) -> None:
    with _lock:
        _live.pop(tree.leader, None)
        _direct.discard(tree.leader)


def note_child(pid: int) -> None:
    """A child swapd spawned that is not an engine (cmdStop): not an adopted orphan."""
    with _lock:
        _direct.add(pid)


def forget_child(pid: int) -> None:
    with _lock:
        _direct.discard(pid)


def _adopted(procs: Mapping[int, _Proc]) -> list[int]:
    """Live processes re-parented to swapd (its subreaper role): orphans of some engine.

    Only once `set_subreaper` succeeded: until then a child swapd did not spawn through
    `track`/`note_child` is not an orphan (a test process has many such children).
    """
    if not _subreaper:
        return []
    me = os.getpid()
    with _lock:
        direct = set(_direct)
    return [p for p, info in procs.items() if info.ppid == me and p not in direct
            and not info.zombie]


def _assign(procs: Mapping[int, _Proc], trees: Mapping[str, Tree]) -> dict[str, set[int]]:
    """The live members of each tree, from one snapshot of /proc."""
    roots: dict[str, set[int]] = {name: set() for name in trees}
    by_marker = {t.marker: name for name, t in trees.items() if t.marker}
    by_pgid: dict[int, list[str]] = {}
    for name, tree in trees.items():
        leader = procs.get(tree.leader)
        # A leader pid that now names a younger process means our group is empty (a pid
        # stays reserved while it is some group's pgid): its pgid says nothing then.
        if leader is None or abs(leader.start - tree.start) <= _TICK_SLACK:
            by_pgid.setdefault(tree.pgid, []).append(name)
        for pid in cgroup_members(tree.cgroup):
            roots[name].add(pid)
        for pid, start in tree.known:
            info = procs.get(pid)
            if info is not None and info.start == start:
                roots[name].add(pid)
    oldest = min((t.start for t in trees.values()), default=0) - _TICK_SLACK
    for pid, info in procs.items():
        if info.zombie or info.start < oldest:
            continue
        for name in by_pgid.get(info.pgid, ()):
            if info.start >= trees[name].start - _TICK_SLACK:
                roots[name].add(pid)
        if by_marker:
            owner = by_marker.get(read_marker(pid) or "")
            if owner is not None and info.start >= trees[owner].start - _TICK_SLACK:
                roots[owner].add(pid)
    # Orphans re-parented to swapd without a marker (it cleared its environment) belong
    # to an engine that started before them; given to the newest such engine we track.
    with _lock:
        live = dict(_live)
    for pid in _adopted(procs):
        # One with a marker is found by it (for its own engine, maybe not asked about here).
        if any(pid in members for members in roots.values()) or read_marker(pid) is not None:
            continue
        start = procs[pid].start
        owners = sorted((t.start, t.leader) for t in live.values() if t.start <= start)
        if owners:
            newest = owners[-1][1]
            for name, tree in trees.items():
                if tree.leader == newest:
                    roots[name].add(pid)
    # Whatever descends from a member is a member (it may have cleared its environment
    # and changed group and session): close over parenthood.
    children: dict[int, list[int]] = {}
    for pid, info in procs.items():
        if not info.zombie:
            children.setdefault(info.ppid, []).append(pid)
    out: dict[str, set[int]] = {}
    for name, seeds in roots.items():
        members = {p for p in seeds if p in procs and not procs[p].zombie}
        todo = list(members)
        while todo:
            for child in children.get(todo.pop(), ()):
                if child not in members:
                    members.add(child)
                    todo.append(child)
        out[name] = members
    return out


def engine_trees(trees: Mapping[str, Tree]) -> dict[str, list[int]]:
    """Pids of the live processes of each tree (one /proc pass for all of them).

    What the GPU sampler (per-engine RSS) and memory accounting use as "the engine's
    processes". Safe from any thread.
    """
    if not trees:
        return {}
    found = _assign(_snapshot(), trees)
    return {name: sorted(pids) for name, pids in found.items()}


def engine_tree(tree: Tree) -> list[int]:
    """Pids of the live processes of one engine's tree (leader included while alive)."""
    return engine_trees({"": tree})[""]


def group_members(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes in process group `pgid`."""
    return sorted(p for p, info in _snapshot().items() if info.pgid == pgid and not info.zombie)


# -- subreaper and zombies -------------------------------------------------------------------


_subreaper = False


def set_subreaper() -> bool:
    """Make this process the child subreaper of its descendants (Linux ≥ 3.4).

    Orphans of an engine then become swapd's children instead of init's, stay reachable
    by ppid, and must be reaped by swapd (`reap_adopted`).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        log.warning("cannot become child subreaper; orphans are found by marker only",
                    error=str(exc))
        return False
    global _subreaper
    _subreaper = True
    return True


_zombies_seen: dict[int, float] = {}


def reap_adopted() -> int:
    """Collect the exit status of adopted orphans that died; returns how many.

    Only zombies swapd did not spawn itself, and only once seen twice: the child watcher
    of the event loop owns the engines' leaders and collects them at once.
    """
    me = os.getpid()
    now = time.monotonic()
    with _lock:
        direct = set(_direct)
    zombies = []
    for pid in _children_of(me):
        if pid in direct:
            continue
        info = _stat(pid)
        if info is not None and info.zombie and info.ppid == me:
            zombies.append(pid)
    reaped = 0
    for pid in zombies:
        first = _zombies_seen.setdefault(pid, now)
        if now - first < _ADOPTED_ZOMBIE_AGE:
            continue
        with contextlib.suppress(ChildProcessError, OSError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                reaped += 1
        _zombies_seen.pop(pid, None)
    for pid in [p for p in _zombies_seen if p not in zombies]:
        del _zombies_seen[pid]
    return reaped


def _children_of(pid: int) -> list[int]:
    # /proc/<pid>/task/*/children (CONFIG_PROC_CHILDREN) is cheap; else scan /proc.
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        for tid in tasks:
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
                out += [int(x) for x in text.split()]
        return out
    except OSError:
        return [p for p, info in _snapshot().items() if info.ppid == pid]


# -- signals -------------------------------------------------------------------------------


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to every member of the group; False when the group is gone."""
    if pgid <= 1:
        return False
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal_pids(pids: Iterable[int], sig: int, tree: Tree | None = None) -> int:
    """Signal each pid through a pidfd, re-checking after opening it that it is still
    the process we mean (younger than the tree's leader): a pid freed and reused between
    the scan and the signal is never hit. Returns how many were signalled."""
    sent = 0
    for pid in pids:
        if pid <= 1 or pid == os.getpid():
            continue
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            info = _stat(pid)
            if info is None or (tree is not None and info.start < tree.start):
                continue
            signal.pidfd_send_signal(fd, sig)
            sent += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return sent


def kill_cgroup(path: str | None) -> bool:
    """`cgroup.kill` (Linux ≥ 5.14): SIGKILL every member at once, forks included."""
    if not path:
        return False
    try:
        Path(path, "cgroup.kill").write_text("1")
    except OSError:
        for pid in cgroup_members(path):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return False
    return True


def signal_tree(tree: Tree, sig: int) -> int:
    """Send `sig` once to every live member of `tree`: the group by killpg (one signal
    per member, as before), the members that left the group one by one. Returns how
    many members there were."""
    procs = _snapshot()
    members = _assign(procs, {"": tree})[""]
    if not members:
        return 0
    if sig == signal.SIGKILL:
        kill_cgroup(tree.cgroup)
    grouped = any(procs[p].pgid == tree.pgid for p in members)
    if grouped:
        grouped = signal_group(tree.pgid, sig)
    _signal_pids([p for p in members if not (grouped and procs[p].pgid == tree.pgid)], sig, tree)
    return len(members)


async def wait_tree_gone(tree: Tree, timeout: float) -> bool:
    """Wait until no live member of `tree` is left; True if that happened in time."""
    deadline = time.monotonic() + timeout
    interval = _POLL_MIN
    while True:
        if not await asyncio.to_thread(engine_tree, tree):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(min(interval, max(deadline - time.monotonic(), 0)))
        interval = min(interval * 1.5, _POLL_MAX)


async def kill_tree(tree: Tree) -> bool:
    """SIGKILL every member and wait until none is left. True if anything was killed."""
    sent = await asyncio.to_thread(signal_tree, tree, signal.SIGKILL) > 0
    # SIGKILL cannot be ignored, but a member may fork meanwhile, and one stuck in
    # uninterruptible sleep (D state, a driver call) leaves only later. Keep confirming.
    while not await wait_tree_gone(tree, 1.0):
        await asyncio.to_thread(signal_tree, tree, signal.SIGKILL)
    reap_adopted()
    return sent


async def terminate_tree(tree: Tree, grace: float) -> bool:
    """SIGTERM the tree, SIGKILL whatever is left after `grace` seconds.

    Returns True when SIGKILL had to be sent; returns only once no member is left.
    """
    if not await asyncio.to_thread(signal_tree, tree, signal.SIGTERM):
        await kill_tree(tree)  # nothing alive; a member forked meanwhile is still caught
        return False
    if await wait_tree_gone(tree, grace):
        reap_adopted()
        return False
    return await kill_tree(tree)


# Plain process groups (cmdStop's own process, whose tree we do not track).


async def kill_group(pgid: int) -> bool:
    """SIGKILL the group and wait until it is gone. True if anything was killed."""
    sent = signal_group(pgid, signal.SIGKILL)
    while await asyncio.to_thread(group_members, pgid):
        await asyncio.sleep(_POLL_MIN)
        signal_group(pgid, signal.SIGKILL)
    return sent


# -- cgroups ---------------------------------------------------------------------------------


def _cgroup2_mount() -> tuple[str, str] | None:
    """(mount point, root inside the hierarchy) of the cgroup v2 file system."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            fields = left.split()
            return fields[4], fields[3]
    return None


def own_cgroup() -> str | None:
    """The directory of swapd's own cgroup v2 when swapd may create cgroups under it.

    Delegated means: writable by us, and not the root of the hierarchy (a root swapd
    outside systemd does not litter the host's top-level cgroup).
    """
    mount = _cgroup2_mount()
    if mount is None:
        return None
    mount_point, mount_root = mount
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    if not path or path == "/" or path.endswith(" (deleted)"):
        return None
    rel = os.path.relpath(path, mount_root) if mount_root != "/" else path.lstrip("/")
    if rel.startswith(".."):
        return None
    directory = os.path.join(mount_point, rel)
    if not (os.access(directory, os.W_OK) and os.access(os.path.join(directory, "cgroup.procs"),
                                                         os.W_OK)):
        return None
    return directory


_cgroup_parent: str | None = None


def enable_cgroups() -> str | None:
    """Give each engine its own cgroup from now on, when swapd's cgroup is delegated to
    it; returns that cgroup's directory (None: marker, group and subreaper only)."""
    global _cgroup_parent
    _cgroup_parent = own_cgroup()
    return _cgroup_parent


def engine_cgroup(model: str, marker: str) -> str | None:
    """A new cgroup for one spawn of `model`, or None when cgroups are not in use."""
    if _cgroup_parent is None:
        return None
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in model)[:64]
    return make_cgroup(_cgroup_parent, f"engine-{safe}-{marker.rsplit(':', 1)[-1]}")


class CgroupEntry:
    """Moves the child into the engine's cgroup between fork and exec (`preexec_fn`), so
    that nothing the engine ever forks starts outside it. Only an `os.write` on a file
    opened before the fork runs in the child: nothing that could take a lock."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def join(self) -> None:
        try:
            os.write(self._fd, b"0")
        except OSError:
            pass  # the parent sees that the child is not in the cgroup, and says so

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def cgroup_entry(path: str | None) -> CgroupEntry | None:
    if path is None:
        return None
    try:
        return CgroupEntry(os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC))
    except OSError as exc:
        log.warning("cannot open engine cgroup", path=path, error=str(exc))
        return None


def make_cgroup(parent: str, name: str) -> str | None:
    """Create the engine cgroup `parent/name`; None (logged) when that is not possible."""
    path = os.path.join(parent, name)
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except OSError as exc:
        log.warning("cannot create engine cgroup", path=path, error=str(exc))
        return None
    return path


def remove_cgroup(path: str | None) -> None:
    """Remove an (empty) engine cgroup; an error only means it is still busy or gone."""
    if path:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def in_cgroup(pid: int, path: str) -> bool:
    """Is `pid` a member of the cgroup directory `path`?"""
    return pid in cgroup_members(path)


def ticks_now() -> int:
    """Now, on the clock of /proc/<pid>/stat start times (ticks since boot)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * CLOCK_TICKS)


# -- listening sockets: whose is a port? ----------------------------------------------------

_TCP_LISTEN = "0A"


@dataclass(frozen=True)
class Listener:
    inode: int
    uid: int


def listeners(port: int) -> list[Listener]:
    """TCP sockets listening on `port` (any address, IPv4 or IPv6) in our network namespace.

    Asked of the kernel over netlink (well under a millisecond); /proc/net/tcp{,6} only
    where netlink is not available (that text lists every socket: ~10-20 ms with a few
    hundred, and this runs between an engine's first answer and the request waiting)."""
    try:
        return [Listener(inode, uid) for inode, uid in sockdiag.listening(port)]
    except OSError:
        return _proc_listeners(port)


def _proc_listeners(port: int) -> list[Listener]:
    found: list[Listener] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            try:
                local, state, uid, inode = fields[1], fields[3], int(fields[7]), int(fields[9])
                if state == _TCP_LISTEN and int(local.rsplit(":", 1)[1], 16) == port and inode:
                    found.append(Listener(inode, uid))
            except (IndexError, ValueError):
                continue
    return found


def _socket_inodes(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def _owners(inodes: set[int], pids: Iterable[int]) -> dict[int, int]:
    """inode -> a pid among `pids` holding it."""
    found: dict[int, int] = {}
    for pid in pids:
        for inode in _socket_inodes(pid) & inodes:
            found.setdefault(inode, pid)
        if len(found) == len(inodes):
            break
    return found


def _describe(pid: int) -> str:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return f"pid {pid}"
    return f"pid {pid} ({comm})"


def port_holder(port: int) -> str | None:
    """Who listens on `port`: "pid 1234 (python3)"; None when nobody does.

    A socket of a process swapd may not inspect (another user's) is named by its uid.
    """
    found = listeners(port)
    return _foreign({x.inode for x in found}, found) if found else None


def port_owned_by(port: int, tree: Tree) -> tuple[bool, str | None]:
    """(every socket listening on `port` belongs to `tree` and there is one, the foreign
    holder if any). A readiness answer counts only when the first is True: otherwise a
    process that squats the engine's port would be sent the users' prompts."""
    found = listeners(port)
    if not found:
        return False, None
    inodes = {x.inode for x in found}
    # The leader holds the port in nearly every engine (llama-server, `vllm serve`): its
    # fds alone answer, without the scan of every process's stat and environ that finds
    # the whole tree (~1-2 ms, on the way from the engine's first 200 to a waiting request).
    leader = _stat(tree.leader)
    checked = (leader is not None and not leader.zombie
               and abs(leader.start - tree.start) <= _TICK_SLACK)
    ours = _owners(inodes, [tree.leader]) if checked else {}
    if len(ours) < len(inodes):
        rest = [p for p in engine_tree(tree) if not (checked and p == tree.leader)]
        ours.update(_owners(inodes - set(ours), rest))
    if len(ours) == len(inodes):
        return True, None
    return False, _foreign(inodes - set(ours), found)


def _foreign(inodes: set[int], found: list[Listener]) -> str:
    owners = _owners(inodes, sorted(_snapshot()))
    if owners:
        return _describe(min(owners.values()))
    uid = next(x.uid for x in found if x.inode in inodes)
    return f"a process of uid {uid} that swapd cannot inspect"
