"""sd_notify against a real AF_UNIX datagram socket, and the unit file against systemd."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from swapd import systemd

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "swapd.service"


def _bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address[1:] if address.startswith("@") else address)
    sock.settimeout(5)
    return sock


@pytest.fixture(params=["path", "abstract"])
def notify_socket(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[socket.socket]:
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
    else:
        address = f"@swapd-test-{uuid.uuid4().hex}"
    sock = _bind(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    try:
        yield sock
    finally:
        sock.close()


def test_ready_stopping_status(notify_socket: socket.socket) -> None:
    assert systemd.ready()
    assert notify_socket.recv(4096) == b"READY=1"
    assert systemd.ready("serving qwen")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving qwen"
    assert systemd.status("tenant: llama (ready)")
    assert notify_socket.recv(4096) == b"STATUS=tenant: llama (ready)"
    assert systemd.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"


async def test_watchdog_loop_pings_until_cancelled(notify_socket: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    notify_socket.setblocking(False)
    task = asyncio.create_task(systemd.watchdog_loop(0.01))
    try:
        for _ in range(3):
            data = await asyncio.wait_for(loop.sock_recv(notify_socket, 4096), 5)
            assert data == b"WATCHDOG=1"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert task.cancelled()


def test_explicit_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    address = str(tmp_path / "n.sock")
    with _bind(address) as sock:
        assert systemd.notify("STATUS=x", {"NOTIFY_SOCKET": address})
        assert sock.recv(4096) == b"STATUS=x"


def test_unset_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.ready() is False
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": ""}) is False


def test_socket_errors_do_not_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.ready() is False
    assert systemd.notify("WATCHDOG=1") is False  # again: logged once, still no raise
    monkeypatch.setenv("NOTIFY_SOCKET", f"@swapd-none-{uuid.uuid4().hex}")
    assert systemd.stopping() is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert systemd.watchdog_interval(env) == expected


def test_watchdog_interval_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() == 1.0


def test_engine_must_not_inherit() -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
        assert name in systemd.SYSTEMD_ENV_VARS


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_unit_has_the_contract() -> None:
    d = _directives(UNIT.read_text())
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert d["KillMode"] == ["mixed"]
    assert d["Restart"] == ["on-failure"]
    assert int(d["TimeoutStopSec"][0]) > 30 + 10  # above shutdownTimeout + a stop grace
    assert int(d["WatchdogSec"][0]) > 0
    assert d["User"] == ["swapd"]
    assert "PrivateDevices" not in d  # would hide /dev/nvidia*
    assert any(v.startswith("char-nvidia") for v in d["DeviceAllow"])
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


README = UNIT.parent / "README.md"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_the_unit_as_the_readme_installs_it(tmp_path: Path) -> None:
    readme = README.read_text()
    # The README installs the unit file unchanged, with the drop-in it shows for local changes.
    assert "sudo install -m 0644 systemd/swapd.service /etc/systemd/system/swapd.service" in readme
    assert "sudo ln -sf /opt/swapd/bin/swapd /usr/local/bin/swapd" in readme
    dropin = readme.split("```ini\n", 1)[1].split("```", 1)[0]
    assert dropin.startswith("[Service]")
    # verify rejects an ExecStart binary that does not exist; /usr/local/bin/swapd is a link
    # to the swapd script of a virtualenv, so point the copy at this virtualenv's.
    swapd = Path(sys.executable).parent / "swapd"
    assert swapd.exists()
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/swapd serve --config /etc/swapd/config.yaml" in text
    text = text.replace("ExecStart=/usr/local/bin/swapd ", f"ExecStart={swapd} ")
    units = tmp_path / "system"
    (units / "swapd.service.d").mkdir(parents=True)
    (units / "swapd.service").write_text(text)
    (units / "swapd.service.d" / "override.conf").write_text(dropin)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(units / "swapd.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"},
    )
    # Problems (unknown keys, bad values) are printed, yet the exit code may stay 0: fail on
    # any output.
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert output == "", output
