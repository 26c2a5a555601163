"""llama-swap's routes and llama.cpp's router API on a real swapd with the fake engine
(issue 22, items 3 and 4): a llama-swap user's scripts and a llama.cpp router client work
unchanged."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.client import HTTPConnection, HTTPResponse
from typing import Any

import pytest

from tests.support import Swapd, fake_cmd, http, model, wait_until


@pytest.fixture
def daemon(start_swapd: Callable[..., Swapd]) -> Swapd:
    return start_swapd({
        "models": {
            "a": model(fake_cmd(name="a"), aliases=["alpha"]),
            "Qwen/Qwen3-8B": model(fake_cmd(name="q")),
        },
    })


def raw_get(daemon: Swapd, path: str, headers: dict[str, str] | None = None,
            method: str = "GET") -> HTTPResponse:
    conn = HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    conn.request(method, path, headers=headers or {})
    return conn.getresponse()


def state(daemon: Swapd, model_id: str) -> str:
    return str(daemon.status()["models"][model_id]["state"])


def test_llamaswap_inference_routes_reach_the_engine_with_its_own_path(daemon: Swapd) -> None:
    # /v/* is the versionless form of /v1/*: the engine sees /chat/completions (#728).
    code, body = daemon.post("/v/embeddings", {"model": "alpha", "input": "x"})
    assert code == 200 and body["path"] == "/embeddings", body
    code, body = daemon.post("/audioapi/v1/tasks/run", {"model": "a", "task": "tts"})
    assert code == 200 and body["path"] == "/v1/tasks/run", body
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/audio/voices"):
        code, body = daemon.post(path, {"model": "a"})
        assert code == 200 and body["path"] == path, (path, body)
    # Model-routed GETs take ?model= and keep their query.
    for path in ("/sdapi/v1/loras", "/v1/audio/voices", "/props"):
        code, body = daemon.get(f"{path}?model=Qwen/Qwen3-8B&x=1")
        assert code == 200 and body["path"] == path and "x=1" in body["query"], (path, body)
        assert body["x_served_by"] == "q"
    code, body = daemon.get("/sdapi/v1/loras")
    assert code == 400 and body["error"]["code"] == "missing_model"
    code, body = daemon.get("/sdapi/v1/loras?model=nope")
    assert code == 404 and body["error"]["code"] == "model_not_found"


def test_upstream_without_slash_redirects_and_the_list(daemon: Swapd) -> None:
    resp = raw_get(daemon, "/upstream/a?x=1")
    assert resp.status == 301 and resp.getheader("Location") == "/upstream/a/?x=1"
    resp = raw_get(daemon, "/upstream/Qwen/Qwen3-8B")
    assert resp.status == 301 and resp.getheader("Location") == "/upstream/Qwen/Qwen3-8B/"
    resp = raw_get(daemon, "/upstream/a", method="POST")
    assert resp.status == 308
    assert state(daemon, "a") == "stopped"  # a redirect starts nothing
    code, body = daemon.get("/upstream/a/")
    assert code == 200 and body["path"] == "/"
    code, listing = daemon.get("/upstream")
    assert code == 200
    assert {m["id"]: m["url"] for m in listing["data"]} == {
        "a": "/upstream/a/", "Qwen/Qwen3-8B": "/upstream/Qwen/Qwen3-8B/"}
    resp = raw_get(daemon, "/upstream", {"Accept": "text/html"})
    assert resp.status == 302 and resp.getheader("Location") == "/ui"


def test_api_unload_version_health_and_activity(daemon: Swapd) -> None:
    assert daemon.post("/v1/chat/completions", {"model": "a", "messages": []})[0] == 200
    assert daemon.post("/v1/chat/completions", {"model": "Qwen/Qwen3-8B",
                                                "messages": []})[0] == 200
    # llama-swap's per-model unload: the id unencoded, even with '/'; "OK" as text.
    code, body = daemon.post("/api/models/unload/Qwen/Qwen3-8B")
    assert (code, body) == (200, "OK")
    assert state(daemon, "Qwen/Qwen3-8B") == "stopped"
    code, body = daemon.post("/api/models/unload/nope")
    assert code == 404 and body["error"]["code"] == "model_not_found"
    assert daemon.post("/v1/chat/completions", {"model": "a", "messages": []})[0] == 200
    assert daemon.post("/api/models/unload") == (200, {"msg": "ok"})
    assert state(daemon, "a") == "stopped"
    code, version = daemon.get("/api/version")
    assert code == 200 and set(version) == {"version", "commit", "build_date"}
    assert daemon.get("/wol-health") == (200, "OK")
    code, page = daemon.get("/api/metrics/activity?limit=2")
    assert code == 200 and page["limit"] == 2 and page["page"] == 1
    assert page["total"] == 3 and page["total_pages"] == 2 and len(page["data"]) == 2
    newest = page["data"][0]
    assert newest["model"] == "a" and newest["req_path"] == "/v1/chat/completions"
    assert newest["resp_status_code"] == 200 and newest["duration_ms"] >= 0
    assert set(newest["tokens"]) >= {"input_tokens", "output_tokens", "tokens_per_second"}
    code, page = daemon.get("/api/metrics/activity?model=Qwen/Qwen3-8B")
    assert code == 200 and page["total"] == 1
    assert daemon.get("/api/metrics/activity?limit=1000")[0] == 400
    code, stats = daemon.get("/api/metrics/stats")
    assert code == 200 and stats["total_requests"] == 3


def sse_lines(daemon: Swapd, path: str, found: list[str], ready: threading.Event) -> None:
    conn = HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    assert resp.status == 200
    ready.set()
    try:
        while line := resp.readline():
            found.append(line.decode().rstrip("\r\n"))
    except OSError:
        pass


@pytest.fixture
def listen(daemon: Swapd) -> Iterator[Callable[[str], list[str]]]:
    threads: list[threading.Thread] = []

    def start(path: str) -> list[str]:
        found: list[str] = []
        ready = threading.Event()
        thread = threading.Thread(target=sse_lines, args=(daemon, path, found, ready),
                                  daemon=True)
        thread.start()
        assert ready.wait(10)
        threads.append(thread)
        return found

    yield start
    daemon.stop()
    for thread in threads:
        thread.join(10)


def test_api_events_send_model_status_on_every_change(daemon: Swapd, listen: Any) -> None:
    lines = listen("/api/events")

    def messages() -> list[dict[str, Any]]:
        out = []
        for line in lines:
            if line.startswith("data:"):
                envelope = json.loads(line[5:])
                out.append({"type": envelope["type"], "data": json.loads(envelope["data"])})
        return out

    wait_until(lambda: any(m["type"] == "profileChanged" for m in messages()))
    first = messages()[0]
    assert first["type"] == "modelStatus"
    assert {m["id"]: m["state"] for m in first["data"]} == {
        "Qwen/Qwen3-8B": "stopped", "a": "stopped"}
    assert "event:message" in lines
    assert daemon.post("/v1/chat/completions", {"model": "a", "messages": []})[0] == 200

    def a_states() -> list[str]:
        return [next(x["state"] for x in m["data"] if x["id"] == "a")
                for m in messages() if m["type"] == "modelStatus"]

    wait_until(lambda: "ready" in a_states())
    assert "starting" in a_states()
    wait_until(lambda: any(m["type"] == "activity" for m in messages()))
    # Logs: swapd's own ("proxy", its history first) and the engines' ("upstream").
    logs = [m["data"] for m in messages() if m["type"] == "logData"]
    assert any(x["source"] == "proxy" and "swapd listening" in x["data"] for x in logs), logs
    wait_until(lambda: any(m["type"] == "logData" and m["data"]["source"] == "upstream"
                           for m in messages()))


def test_llamacpp_router_api(daemon: Swapd, listen: Any) -> None:
    lines = listen("/models/sse")
    code, listing = daemon.get("/models")
    assert code == 200 and listing["object"] == "list"
    entry = next(m for m in listing["data"] if m["id"] == "a")
    assert entry["status"]["value"] == "unloaded"
    assert entry["status"]["args"][0].endswith("python") or "fake_engine" in " ".join(
        entry["status"]["args"])
    assert entry["aliases"] == ["alpha"] and entry["tags"] == []
    assert entry["object"] == "model" and "owned_by" in entry and "created" in entry
    # Load answers at once; SSE and /models tell when it is loaded.
    assert daemon.post("/models/load", {"model": "a"}) == (200, {"success": True})
    wait_until(lambda: daemon.get("/models")[1]["data"][0]["status"]["value"] == "loaded"
               or state(daemon, "a") == "ready")
    code, body = daemon.post("/models/load", {"model": "a"})
    assert code == 400 and body["error"]["type"] == "invalid_request_error"
    code, body = daemon.post("/models/load", {"model": "nope"})
    assert code == 404 and body["error"]["type"] == "not_found_error"
    code, props = daemon.get("/props?model=a")
    assert code == 200 and props["path"] == "/props"
    code, props = daemon.get("/props")
    assert code == 200 and props["role"] == "router"
    assert daemon.post("/models/unload", {"model": "alpha"}) == (200, {"success": True})
    assert state(daemon, "a") == "stopped"
    code, body = daemon.post("/models/unload", {"model": "a"})
    assert code == 400 and "not running" in body["error"]["message"]
    code, body = daemon.post("/models/unload", {"model": "nope"})
    assert code == 400
    code, body = daemon.post("/models/unload", "not json")
    assert code == 400

    def events() -> list[dict[str, Any]]:
        return [json.loads(line[6:]) for line in lines if line.startswith("data: ")]

    wait_until(lambda: any(e["data"]["status"] == "unloaded" for e in events()))
    assert [(e["event"], e["data"]["status"]) for e in events()] == [
        ("model_status", "loading"), ("status_change", "loaded"),
        ("status_change", "unloaded")]
    assert all(e["model"] == "a" for e in events())


def test_operations_and_router_routes_are_behind_the_operations_gate(
        start_swapd: Callable[..., Swapd]) -> None:
    daemon = start_swapd({"apiKeys": ["k-api"], "adminKeys": ["k-admin"],
                          "models": {"a": model(fake_cmd(name="a"))}})
    api = {"Authorization": "Bearer k-api"}
    admin = {"Authorization": "Bearer k-admin"}
    for method, path in (("POST", "/api/models/unload"), ("POST", "/api/models/unload/a"),
                         ("GET", "/api/version"), ("GET", "/api/metrics/activity"),
                         ("POST", "/models/load"), ("POST", "/models/unload")):
        assert http(method, daemon.url + path, headers=api)[0] == 401, path
    assert http("GET", daemon.url + "/api/version", headers=admin)[0] == 200
    for path in ("/models", "/upstream", "/props", "/sdapi/v1/loras?model=a"):
        assert daemon.get(path)[0] == 401, path
    assert daemon.get("/models", headers=api)[0] == 200
    assert daemon.get("/wol-health") == (200, "OK")
