"""Issue 21's attacks on what swapd relays, replayed against real swapd processes over real
sockets (docs/security.md): a peer turned into a path to its admin routes (item 3), a client
that never reads holding the tenant (item 4), `/upstream` skipping filters and activity
(item 6), the admin key reaching an engine (item 7)."""

from __future__ import annotations

import http.client as http_client
import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from swapd.config.loader import load_config
from swapd.http.proxy import under_root
from tests.support import PY, Swapd, fake_cmd, metric_value, model, wait_until

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


# -- item 3: a peer is another trust zone ----------------------------------------------------

def send(daemon: Swapd, method: str, path: str, body: bytes = b"",
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """A request whose path goes out byte for byte as written (`%2e%2e`, `..` included)."""
    conn = http_client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            conn.putheader(key, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw.decode(errors="replace")


def test_a_peer_is_relayed_inference_only_never_its_admin_routes(start_swapd, tmp_path) -> None:
    """`PUT /upstream/box2/e1/admin/recipes/pwn`, then `…/models/pwn/load`, ran a command on
    a peer swapd (its relayed requests came from loopback); `%2e%2e` climbed out of the peer
    URL's prefix. Only inference paths go through a peer, normalised under its root."""
    (tmp_path / "recipes").mkdir()
    peer = start_swapd({
        "apiKeys": ["peer-key"],
        "include": "recipes/*.yaml",
        "models": {"e1": model(fake_cmd(name="e1"))},
    }, name="peer.yaml", state_dir=tmp_path / "peer-state")
    front = start_swapd({
        "apiKeys": ["client-key"],
        "peers": {"box2": {"proxy": peer.url, "models": ["e1"], "apiKey": "peer-key",
                           "filters": {"stripParams": "temperature"}}},
        "models": {"local": model(fake_cmd(name="local"))},
    }, name="front.yaml", state_dir=tmp_path / "front-state")
    client = {"Authorization": "Bearer client-key"}
    marker = tmp_path / "pwned"
    recipe = json.dumps({"cmd": f"{PY} -c 'import pathlib,sys; pathlib.Path(sys.argv[1])"
                                f".touch()' {marker} ${{PORT}}"}).encode()

    # What a peer is for still works, with the peer's filters, as on /v1.
    body = json.dumps({"model": "box2/e1", "temperature": 2, "messages": []}).encode()
    code, doc = send(front, "POST", "/upstream/box2/e1/v1/chat/completions", body,
                     {**client, **JSON})
    assert code == 200, doc
    assert doc["x_served_by"] == "e1"
    assert doc["x_request"]["model"] == "e1" and "temperature" not in doc["x_request"]

    attacks = [
        ("PUT", "/upstream/box2/e1/admin/recipes/pwn", recipe),
        ("POST", "/upstream/box2/e1/models/pwn/load", b""),
        ("POST", "/upstream/box2/e1/models/e1/unload", b""),
        ("GET", "/upstream/box2/e1/status", b""),
        ("GET", "/upstream/box2/e1/logs", b""),
        ("POST", "/upstream/box2/e1/unload", b""),
        ("PUT", "/upstream/box2/e1/%2e%2e/%2e%2e/admin/recipes/pwn", recipe),
        ("PUT", "/upstream/box2/e1/%2E%2E/admin/recipes/pwn", recipe),
        ("PUT", "/upstream/box2/e1/../../admin/recipes/pwn", recipe),
        ("PUT", "/upstream/box2/e1/v1/chat/completions/%2e%2e/%2e%2e/%2e%2e/admin/recipes/pwn",
         recipe),
        ("POST", "/upstream/box2/e1/v1/%2e%2e/models/pwn/load", b""),
        ("POST", "/upstream/box2/e1/v1%2F..%2F..%2Fmodels%2Fpwn%2Fload", b""),
        ("POST", "/upstream/box2/e1/v1/%252e%252e/models/pwn/load", b""),
        ("POST", "/upstream/box2/e1/./v1/../models/pwn/load", b""),
        ("PUT", "/upstream/box2/e1/v1/chat/completions", recipe),  # inference path, not POST
    ]
    for method, path, data in attacks:
        code, doc = send(front, method, path, data, {**client, **JSON})
        assert code in (400, 403), (method, path, code, doc)
        assert doc["error"]["code"] in ("peer_path_forbidden", "bad_path"), (path, doc)
    # A dot path that resolves to an inference path is that path, and stays one.
    code, doc = send(front, "POST", "/upstream/box2/e1/v1/x/%2e%2e/chat/completions", body,
                     {**client, **JSON})
    assert code == 200 and doc["x_served_by"] == "e1", doc

    assert not list((tmp_path / "recipes").iterdir())
    assert not marker.exists()
    code, listed = peer.get("/v1/models", {"Authorization": "Bearer peer-key"})
    assert [m["id"] for m in listed["data"]] == ["e1"]
    assert "admin/recipes" not in peer.log() and "pwn" not in peer.log()


@pytest.mark.parametrize(("rest", "path"), [
    ("", "/"), ("v1/models", "/v1/models"), ("a/", "/a/"), ("a//b", "/a//b"),
    ("a/./b", "/a/b"), ("a/.", "/a/"), ("a/b/..", "/a/"), ("a/../b", "/b"),
    ("a/b/../../c", "/c"), ("..", None), ("a/../..", None), ("../a", None),
    ("a/../../b", None), ("v1/chat/completions/../../../admin", "/admin"),
    ("v1/chat/completions/../../../../admin", None),
    ("%2e%2e", "/%2e%2e"),  # still encoded: a name, not a dot segment
])
def test_under_root_resolves_dot_segments_and_refuses_a_climb(rest: str,
                                                               path: str | None) -> None:
    assert under_root(rest) == path


def test_a_local_upstream_path_stays_under_the_engine_root(start_swapd, tmp_path) -> None:
    """The same climb against a local model's /upstream: 400, and nothing relayed."""
    daemon = start_swapd({"models": {"m": model(fake_cmd(name="m"))}})
    for path in ("/upstream/m/%2e%2e/x", "/upstream/m/a/%2e%2e/%2e%2e/x", "/upstream/m/../x"):
        code, doc = send(daemon, "GET", path)
        assert code == 400 and doc["error"]["code"] == "bad_path", (path, doc)
    assert daemon.status()["models"]["m"]["pid"] is None  # nothing started for them
    # Dot segments inside the root resolve; a decoded "%" goes out escaped again.
    code, doc = send(daemon, "GET", "/upstream/m/a/%2e%2e/b/%252e%252e?q=%26x")
    assert code == 200, doc
    assert doc["path"] == "/b/%2e%2e" and doc["query"] == "q=%26x", doc


# -- item 6: /upstream gets the model's filters and an activity record -----------------------

def test_upstream_inference_gets_the_models_filters_and_an_activity_record(start_swapd) -> None:
    """`POST /upstream/filt/v1/chat/completions` reached the engine with `temperature`
    despite `stripParams: temperature`, without `setParams`, and left no activity record."""
    daemon = start_swapd({"models": {"filt": model(fake_cmd(name="filt"), filters={
        "stripParams": "temperature",
        "setParams": {"top_p": 0.5},
        "setParamsByID": {"${MODEL_ID}": {"effort": "low"}},
    })}})
    body = {"model": "filt", "temperature": 1.5, "messages": []}
    via_v1 = daemon.post("/v1/chat/completions", body)
    via_upstream = daemon.post("/upstream/filt/v1/chat/completions", body)
    for code, doc in (via_v1, via_upstream):
        assert code == 200, doc
        assert doc["x_request"] == {"model": "filt", "messages": [], "top_p": 0.5,
                                    "effort": "low"}, doc
    # Spelled with extra slashes, it is the same path, and gets the same filters.
    code, doc = daemon.post("/upstream/filt//v1//chat/completions/", body)
    assert code == 200 and "temperature" not in doc["x_request"], doc
    # The path names the model: a body without one gets the filters and no `model`.
    code, doc = daemon.post("/upstream/filt/v1/chat/completions",
                            {"temperature": 1, "messages": []})
    assert code == 200 and doc["x_request"] == {"messages": [], "top_p": 0.5, "effort": "low"}
    # Broken JSON on an inference path is refused as on /v1.
    code, doc = daemon.post("/upstream/filt/v1/chat/completions", b"{nope")
    assert code == 400 and doc["error"]["code"] == "bad_json", doc
    # Other paths stay a raw passthrough.
    code, doc = daemon.post("/upstream/filt/echo", {"temperature": 1})
    assert code == 200 and json.loads(doc["body"]) == {"temperature": 1}, doc

    def records() -> list[str]:
        return [r["path"] for r in daemon.get("/api/activity")[1]["data"]]
    wait_until(lambda: len(records()) == 4, message="four activity records")
    assert records() == ["/v1/chat/completions", "/upstream/filt/v1/chat/completions",
                         "/upstream/filt//v1//chat/completions/",
                         "/upstream/filt/v1/chat/completions"]


# -- item 7: an admin key stays swapd's ------------------------------------------------------

def test_an_admin_key_never_reaches_an_engine_even_with_forward_client_auth(start_swapd) -> None:
    """The status page's chat sent the admin key, and with `forwardClientAuth: true` the
    engine received it. An API key is forwarded; an admin key never is."""
    daemon = start_swapd({
        "apiKeys": ["api-key-1"], "adminKeys": ["admin-key-1"],
        "models": {"fw": model(fake_cmd(name="fw"), forwardClientAuth=True)},
    })

    def engine_saw(headers: dict[str, str]) -> dict[str, str]:
        code, doc = daemon.post("/upstream/fw/echo", {}, headers=headers)
        assert code == 200, doc
        return {k: v for k, v in doc["headers"].items() if k in ("authorization", "x-api-key")}

    assert engine_saw({"Authorization": "Bearer api-key-1"}) == {
        "authorization": "Bearer api-key-1"}
    assert engine_saw({"x-api-key": "api-key-1"}) == {"x-api-key": "api-key-1"}
    assert engine_saw({"Authorization": "Bearer admin-key-1"}) == {}
    assert engine_saw({"x-api-key": "admin-key-1"}) == {}
    # Smuggled beside an API key, or under another scheme: dropped all the same.
    assert engine_saw({"Authorization": "Bearer api-key-1", "x-api-key": "admin-key-1"}) == {
        "authorization": "Bearer api-key-1"}
    assert engine_saw({"x-api-key": "api-key-1", "Authorization": "Token admin-key-1"}) == {
        "x-api-key": "api-key-1"}
