"""Helpers the tests (and bench/) share: free ports, configs that run the fake engine, a real
swapd process, waits with a deadline, HTTP clients. Fixtures are in tests/conftest.py; test
files import helpers from here, never from each other."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent.parent  # tests/
FAKE_ENGINE = HERE / "fake_engine.py"
PY = sys.executable


def port_block(n: int = 16) -> int:
    """The first of `n` free ports below the kernel's ephemeral range.

    Models take ${PORT} = startPort, startPort + 1, ...: a port from the ephemeral
    range can become the local port of some client connection at any moment. Under
    pytest-xdist each worker draws from a slice of its own, so two workers never pick the
    same port between one's check and its daemon's bind. Within a worker, blocks are handed
    out in turn from a cursor, not drawn at random: a daemon's listen port (drawn first, not
    yet bound) once fell inside the model block drawn next, and its first model found its
    port taken by swapd itself.
    """
    global _cursor
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    start, stop = max(1024, low - 12000), low - n
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    if workers > 1:
        width = (stop - start) // workers
        start, stop = start + worker * width, start + (worker + 1) * width
    if _cursor is None or not start <= _cursor:
        _cursor = random.randrange(start, stop)  # a fresh run need not reuse the last's ports
    for _ in range(200):
        base = _cursor if _cursor + n <= stop else start
        _cursor = base + n
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise AssertionError("no block of free ports")


_cursor: int | None = None


def free_port() -> int:
    return port_block(1)


# A stand-in for a long-lived process: it idles until a signal ends it, SIGALRM at the latest
# (a safety net: a test that forgets it never leaves it running long).
IDLE = "import signal; signal.alarm(120); signal.pause()"
# The same, holding argv[1] bytes of memory and saying so first.
HOG = (
    "import signal, sys; held = b'\\x5a' * int(sys.argv[1]); print('holding', flush=True); "
    "signal.alarm(120); signal.pause()"
)


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               message: str = "condition") -> Any:
    """Poll `condition` until it returns something truthy (returned); fail after `timeout`.

    For a test on the event loop use `wait_until_async`: this one blocks the thread."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


async def wait_until_async(condition: Callable[[], Any], timeout: float = 10.0,
                           interval: float = 0.01, message: str = "condition") -> Any:
    """`wait_until` for coroutines: the loop keeps running between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def fake_cmd(*flags: str, record: Path | None = None, name: str = "fake") -> str:
    """A `cmd:` string that runs the fake engine on ${PORT}."""
    parts = [PY, str(FAKE_ENGINE), "--port", "${PORT}", "--model-name", name, *flags]
    if record is not None:
        parts += ["--record", str(record)]
    return " ".join(parts)


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def engine_boot_seconds(folder: Path) -> float:
    """How long the fake engine takes, on this machine now, from its spawn to its first
    record (interpreter and imports): a reference for a test whose engine must get that far
    within a timeout swapd enforces (a loaded runner takes seconds, an idle one 0.3 s)."""
    rec = folder / f"boot-{time.monotonic_ns()}.jsonl"
    t0 = time.monotonic()
    proc = subprocess.Popen([PY, str(FAKE_ENGINE), "--port", str(free_port()), "--record",
                             str(rec)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: read_records(rec), timeout=60, interval=0.01,
                   message="the fake engine's start record")
        return time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(30)


@dataclass
class Swapd:
    """A swapd daemon running as a real process."""

    config_path: Path
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    state_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, headers: dict[str, str] | None = None,
            timeout: float = 30) -> tuple[int, Any]:
        return http("GET", self.url + path, headers=headers, timeout=timeout)

    def post(self, path: str, body: Any = None, headers: dict[str, str] | None = None,
             timeout: float = 60) -> tuple[int, Any]:
        return http("POST", self.url + path, body, headers=headers, timeout=timeout)

    def status(self) -> dict[str, Any]:
        code, doc = self.get("/status")
        assert code == 200, doc
        return doc  # type: ignore[no-any-return]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
         timeout: float = 60) -> tuple[int, Any]:
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        if isinstance(body, (bytes, str)):
            data = body.encode() if isinstance(body, str) else body
        else:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        status = exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def raw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes as they are (headers no HTTP client would send), read until the server
    closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            out += b"<timeout>"
    return out


def write_config(tmp_path: Path, config: dict[str, Any], name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path



def wait_healthy(daemon: Swapd, timeout: float = 20) -> None:
    """Wait until a swapd just spawned answers /health; its log if it exited instead."""
    def up() -> bool:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"swapd exited {daemon.proc.returncode}:\n{daemon.log()}")
        try:
            return http("GET", daemon.url + "/health", timeout=1)[0] == 200
        except OSError:
            return False
    wait_until(up, timeout=timeout, message="swapd /health")


def model(cmd: str, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"cmd": cmd, "proxy": "http://127.0.0.1:${PORT}"}
    entry.update(extra)
    return entry


def stream_lines(url: str, body: Any, timeout: float = 30) -> Iterator[tuple[str, dict[str, str]]]:
    """POST JSON and yield the response's lines as they arrive, with its headers."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", parts.path, body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        while True:
            line = resp.readline()
            if not line:
                break
            yield line.decode().rstrip("\r\n"), headers
    finally:
        conn.close()


def multipart(
    fields: dict[str, str], files: dict[str, tuple[str, bytes, str]]
) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type."""
    boundary = "swapdtestboundary"
    out = b""
    for name, value in fields.items():
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                f"{value}\r\n").encode()
    for name, (filename, data, ctype) in files.items():
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                f"filename=\"{filename}\"\r\nContent-Type: {ctype}\r\n\r\n").encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus scrape (0 when the series is absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def gate_middleware() -> Any:
    """swapd's one middleware (Host/Origin, keys, the error response) over an empty config:
    for a test app of a few routes that must answer errors as swapd does."""
    from swapd.config.types import Config
    from swapd.http.appstate import LiveConfig
    from swapd.http.gate import Gate
    from swapd.observe.metrics import Metrics

    return Gate(LiveConfig(Config(models={})), Metrics()).middleware


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than loopback: to connect as another
    machine's client would (None when there is none)."""
    candidates = []
    with contextlib.suppress(OSError):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.254", 9))  # no packet is sent: this only picks a route
            candidates.append(s.getsockname()[0])
    with contextlib.suppress(OSError):
        candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    return next((a for a in candidates if not a.startswith("127.") and a != "0.0.0.0"), None)
