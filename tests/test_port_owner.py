"""Whose is a listening port: the lookup behind the squatter check (swapd/engines/procgroup.py
`port_owned_by`, `port_holder`), with the kernel's netlink sock_diag answer and the /proc/net
fallback. Real sockets and real processes: the engine is a child that listens, the squatter
this test process."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from swapd.engines import procgroup, sockdiag
from tests.support import PY

# Listens on a free port, prints it, and holds it until stdin closes.
LISTEN = ("import socket, sys; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
          "print(s.getsockname()[1], flush=True); sys.stdin.read()")
# An engine whose leader does not hold the port: a child of it does (a launcher, a worker).
VIA_CHILD = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {LISTEN!r}])"


@contextmanager
def engine(script: str) -> Iterator[tuple[procgroup.Tree, int]]:
    """A process tree spawned as swapd spawns engines (its own session), and its port."""
    proc = subprocess.Popen([PY, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # EOF (b"") if it failed: int() says so
        start = procgroup.start_ticks(proc.pid)
        assert start is not None
        yield procgroup.Tree(leader=proc.pid, start=start), int(line)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)


def listening_socket(family: socket.AddressFamily, host: str, port: int = 0) -> socket.socket:
    sock = socket.socket(family)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.listen()
    return sock


def test_netlink_finds_the_listening_sockets_of_a_port_v4_and_v6() -> None:
    """The inode and uid of each socket listening on the port, as /proc/net/tcp{,6} lists
    them; not the connections on that port, not another port's listener."""
    with listening_socket(socket.AF_INET, "127.0.0.1") as v4:
        port = v4.getsockname()[1]
        try:
            v6 = listening_socket(socket.AF_INET6, "::1", port)
        except OSError:
            pytest.skip("no IPv6 loopback here")
        with v6, listening_socket(socket.AF_INET, "127.0.0.1") as other, \
                socket.create_connection(("127.0.0.1", port)):
            accepted, _ = v4.accept()  # ESTABLISHED with local port `port`: not a listener
            with accepted:
                want = {(os.fstat(s.fileno()).st_ino, os.getuid()) for s in (v4, v6)}
                assert set(sockdiag.listening(port)) == want
                from_proc = {(x.inode, x.uid) for x in procgroup._proc_listeners(port)}
                assert from_proc == want
                assert {(x.inode, x.uid) for x in procgroup.listeners(port)} == want
                assert sockdiag.listening(other.getsockname()[1]) == [
                    (os.fstat(other.fileno()).st_ino, os.getuid())]
    assert sockdiag.listening(port) == []


def test_the_engine_leader_s_socket_is_its_own() -> None:
    with engine(LISTEN) as (tree, port):
        assert procgroup.port_owned_by(port, tree) == (True, None)
        assert procgroup.port_holder(port) == procgroup._describe(tree.leader)


def test_a_socket_held_by_a_child_of_the_leader_is_the_engine_s() -> None:
    """The leader does not hold it: found through the whole tree, not the leader alone."""
    with engine(VIA_CHILD) as (tree, port):
        holder = procgroup.port_holder(port)
        assert holder is not None and f"pid {tree.leader} " not in holder
        assert procgroup.port_owned_by(port, tree) == (True, None)


def test_a_socket_of_another_process_is_foreign() -> None:
    """The engine listens on one port; the port it is asked about is held by this process
    (a squatter): not owned, and the squatter is named."""
    with engine(LISTEN) as (tree, _), listening_socket(socket.AF_INET, "127.0.0.1") as squat:
        port = squat.getsockname()[1]
        owned, holder = procgroup.port_owned_by(port, tree)
        assert not owned
        assert holder is not None and holder.startswith(f"pid {os.getpid()} (")
    assert procgroup.port_owned_by(port, tree) == (False, None)  # nobody listens now


def test_without_netlink_proc_net_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel or sandbox without NETLINK_SOCK_DIAG (there is no such kernel here: the
    call is made to fail as it would there)."""
    def no_netlink(port: int) -> list[tuple[int, int]]:
        raise OSError(93, "Protocol not supported")

    monkeypatch.setattr(sockdiag, "listening", no_netlink)
    with engine(LISTEN) as (tree, port), \
            listening_socket(socket.AF_INET, "127.0.0.1") as squat:
        assert procgroup.port_owned_by(port, tree) == (True, None)
        owned, holder = procgroup.port_owned_by(squat.getsockname()[1], tree)
        assert not owned and holder is not None and holder.startswith(f"pid {os.getpid()} (")
