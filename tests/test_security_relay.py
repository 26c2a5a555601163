"""Issue 21's attacks on what swapd relays, replayed against real swapd processes over real
sockets (docs/security.md): a peer turned into a path to its admin routes (item 3), a client
that never reads holding the tenant (item 4), `/upstream` skipping filters and activity
(item 6), the admin key reaching an engine (item 7)."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

from swapd.config.loader import load_config

from .conftest import PY, Swapd, fake_cmd, metric_value, model, wait_until

JSON = {"Content-Type": "application/json"}


def raw_post(port: int, path: str, body: dict[str, Any], *, rcvbuf: int = 0) -> socket.socket:
    """A POST sent from a socket that the test then never reads (a small receive buffer
    makes the stall come sooner)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                 f"\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def in_flight(daemon: Swapd, name: str) -> int:
    return int(daemon.status()["models"][name]["inflight"])


# -- item 4: a client that never reads --------------------------------------------------------

def test_a_client_that_never_reads_a_stream_is_cut_and_frees_the_tenant(start_swapd) -> None:
    """A `stream: true` answer nobody reads held the engine in flight, so another model's
    request waited out queueTimeout (504). With writeTimeout it is cut, counted 499, and
    the other model is served."""
    daemon = start_swapd({
        "writeTimeout": 1,
        "queueTimeout": 30,
        "models": {
            # ~2 KB a token, for ever (as far as a stalled client is concerned).
            "talky": model(fake_cmd("--stream-tokens", "1000000", "--reply", "x" * 2000,
                                    name="talky")),
            "other": model(fake_cmd(name="other")),
        },
    })
    sock = raw_post(daemon.port, "/v1/chat/completions",
                    {"model": "talky", "stream": True, "messages": []}, rcvbuf=4096)
    try:
        wait_until(lambda: in_flight(daemon, "talky") == 1, timeout=30, message="talky serving")
        code, doc = daemon.post("/v1/chat/completions", {"model": "other", "messages": []},
                                timeout=60)
        assert code == 200, doc  # not 504 after queueTimeout
        assert doc["x_served_by"] == "other"

        def cut() -> bool:
            scrape = daemon.get("/metrics")[1]
            return metric_value(scrape, "swapd_requests_total", model="talky", code="499") == 1
        wait_until(cut, timeout=10, message="talky's request counted 499")
        records = daemon.get("/api/activity")[1]["data"]
        assert [r["status"] for r in records if r["model"] == "talky"] == [499]
        assert "client stopped reading" in daemon.log()
    finally:
        sock.close()


def test_write_timeout_loads_with_a_key_path_on_bad_values(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    base = "models: {m: {cmd: 'x --port ${PORT}'}}\n"
    path.write_text(base)
    assert load_config(str(path)).config.write_timeout == 60.0
    path.write_text(base + "writeTimeout: 2.5\n")
    assert load_config(str(path)).config.write_timeout == 2.5
    for bad in ("0", "-1", "soon", ".nan"):
        path.write_text(base + f"writeTimeout: {bad}\n")
        done = subprocess.run([PY, "-m", "swapd", "check", "--config", str(path)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (bad, done.stdout, done.stderr)
        assert "writeTimeout" in done.stderr + done.stdout, (bad, done.stderr)
