"""Activity, token metrics, loading ETA and captures through a real swapd and real fake engines.

What a user reads after a request: its row in /api/activity (and its live stream), the token
series in /metrics, the loading estimate in /status, /v1/models, the sendLoadingState progress
and Retry-After, and (admin only) the captured bodies with their secrets masked.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

from tests.support import fake_cmd, http, metric_value, model, stream_lines, wait_until

CHAT = "/v1/chat/completions"


def chat(stream: bool, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream,
            **extra}


def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, bytes,
                                                                              dict[str, str]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def records(daemon: Any, since: int = 0) -> list[dict[str, Any]]:
    code, doc = daemon.get(f"/api/activity?since={since}")
    assert code == 200, doc
    return doc["data"]  # type: ignore[no-any-return]


def test_each_request_gets_a_record_with_its_tokens_and_the_metrics_count_them(
    start_swapd,
) -> None:
    daemon = start_swapd({"models": {"m": model(fake_cmd("--timings", "--stream-tokens", "6"))}})
    # Streamed, llama.cpp timings in its last chunk; with a session header.
    code, body, _ = post(daemon.url + CHAT, chat(True), {"X-Session-ID": "agent-7"})
    assert code == 200 and body.endswith(b"data: [DONE]\n\n")
    # Streamed with the client's own include_usage: the usage chunk is the client's, kept.
    code, body, _ = post(daemon.url + CHAT, chat(True, stream_options={"include_usage": True}))
    assert b'"usage"' in body
    # A JSON answer.
    code, body, _ = post(daemon.url + CHAT, chat(False))
    assert code == 200
    rows = wait_until(lambda: len(records(daemon)) == 3 and records(daemon), message="3 rows")
    first, second, third = rows
    assert first["model"] == "m" and first["status"] == 200 and first["stream"]
    assert first["session"] == "agent-7"
    assert (first["prompt_tokens"], first["completion_tokens"], first["cached_tokens"]) == (3, 6, 2)
    assert (first["prefill_tps"], first["decode_tps"]) == (240.0, 50.0)
    assert 0 < first["ttft"] <= first["duration"]
    assert second["completion_tokens"] == 6 and not second["estimated"]
    assert (third["prompt_tokens"], third["completion_tokens"]) == (3, 4)
    assert third["ttft"] is None
    assert [r["id"] for r in records(daemon, since=first["id"])] == [second["id"], third["id"]]

    code, text = daemon.get("/metrics")
    assert metric_value(text, "swapd_tokens_total", model="m", kind="prompt") == 9
    assert metric_value(text, "swapd_tokens_total", model="m", kind="completion") == 16
    assert metric_value(text, "swapd_tokens_total", model="m", kind="cached") == 6
    assert metric_value(text, "swapd_time_to_first_token_seconds_count", model="m") == 2
    assert metric_value(text, "swapd_decode_tokens_per_second_count", model="m") == 3
    assert metric_value(text, "swapd_prefill_tokens_per_second_bucket", model="m",
                        le="250.0") == 3


def test_a_stream_without_usage_is_counted_and_marked_estimated(start_swapd) -> None:
    daemon = start_swapd({"models": {"m": model(fake_cmd("--stream-tokens", "7"))}})
    code, _, _ = post(daemon.url + CHAT, chat(True))
    assert code == 200
    row = wait_until(lambda: records(daemon), message="a row")[0]
    assert row["estimated"] and row["completion_tokens"] == 7
    assert row["prompt_tokens"] is None


def test_inject_usage_gives_exact_tokens_and_the_client_never_sees_the_extra_chunk(
    start_swapd,
) -> None:
    daemon = start_swapd({
        "activity": {"injectUsage": True},
        "models": {"m": model(fake_cmd("--stream-tokens", "5"))},
    })
    lines = [line for line, _ in stream_lines(daemon.url + CHAT, chat(True))]
    assert lines.count("data: [DONE]") == 1
    assert not any('"usage"' in line for line in lines)
    row = wait_until(lambda: records(daemon), message="a row")[0]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (3, 5)
    assert not row["estimated"]
    # A client that asked for usage still gets it.
    lines = [line for line, _ in stream_lines(
        daemon.url + CHAT, chat(True, stream_options={"include_usage": True}))]
    assert any('"usage"' in line for line in lines)


def test_the_activity_stream_sends_history_then_live_records(start_swapd) -> None:
    daemon = start_swapd({"models": {"m": model(fake_cmd())}})
    post(daemon.url + CHAT, chat(False))
    wait_until(lambda: records(daemon), message="first row")
    conn = HTTPConnection("127.0.0.1", daemon.port, timeout=20)
    conn.request("GET", "/api/activity/stream")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    got: list[dict[str, Any]] = []

    def read() -> None:
        while len(got) < 2:
            line = resp.readline().decode()
            if line.startswith("data: "):
                got.append(json.loads(line[6:]))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_until(lambda: got, message="history record")
    post(daemon.url + CHAT, chat(True), {"X-Session-ID": "live"})
    reader.join(20)
    conn.close()
    assert [r["id"] for r in got] == [1, 2]
    assert got[1]["session"] == "live"


def test_loading_eta_from_earlier_starts_in_status_models_progress_and_retry_after(
    start_swapd,
) -> None:
    cmd = fake_cmd("--boot-delay", "1.5")
    daemon = start_swapd({
        "maxQueue": 1,
        "models": {"m": model(cmd, sendLoadingState=True)},
    })
    # A first start teaches swapd how long this model takes.
    assert daemon.post("/models/m/load")[0] == 200
    estimate = daemon.status()["models"]["m"]["start_seconds"]
    assert 1.4 <= estimate < 10
    daemon.post("/models/m/unload")
    # A second start, for a request: the ETA shows while it loads, and a request turned away
    # (the queue is full) is told when to come back.
    waiter = threading.Thread(target=post, args=(daemon.url + CHAT, chat(False)), daemon=True)
    waiter.start()
    wait_until(lambda: daemon.status()["models"]["m"]["state"] == "starting"
               and daemon.status()["queue"] == 1, message="starting with one queued")
    eta = daemon.status()["models"]["m"]["eta_seconds"]
    assert eta is not None and 1 <= eta <= estimate
    _, listed = daemon.get("/v1/models")
    entry = next(e for e in listed["data"] if e["id"] == "m")
    assert entry["state"] == "starting" and entry["eta_seconds"] >= 1
    assert entry["start_seconds"] == estimate
    code, body, headers = post(daemon.url + CHAT, chat(False))
    assert code == 503, body
    assert 1 <= int(headers["Retry-After"]) <= estimate + 1
    waiter.join(30)
    # sendLoadingState: the progress text says how long is left.
    daemon.post("/models/m/unload")
    lines = [line for line, _ in stream_lines(daemon.url + CHAT, chat(True))]
    progress = [line for line in lines if "loading m" in line]
    assert progress and "s left" in progress[0], lines[:3]


def test_start_estimates_survive_a_restart(start_swapd, tmp_path: Path) -> None:
    config = {"models": {"m": model(fake_cmd())}}
    daemon = start_swapd(config)
    assert daemon.post("/models/m/load")[0] == 200
    wait_until(lambda: daemon.status()["models"]["m"]["start_seconds"] is not None,
               message="estimate")
    daemon.stop()
    again = start_swapd(config, port=daemon.port, state_dir=daemon.state_dir)
    assert again.status()["models"]["m"]["start_seconds"] is not None


def test_captures_are_admin_only_and_redacted(start_swapd) -> None:
    daemon = start_swapd({
        "captureBuffer": 1,
        "apiKeys": ["user-key"],
        "adminKeys": ["admin-key"],
        "models": {"m": model(fake_cmd())},
    })
    code, _, _ = post(daemon.url + CHAT, chat(False, api_key="sk-in-body"),
                      {"Authorization": "Bearer user-key"})
    assert code == 200
    admin = {"Authorization": "Bearer admin-key"}
    row = wait_until(lambda: daemon.get("/api/activity", headers=admin)[1]["data"],
                     message="a row")[0]
    assert row["captured"]
    # The inference key is not enough to read activity or captures.
    assert daemon.get("/api/activity", {"Authorization": "Bearer user-key"})[0] == 401
    assert daemon.get(f"/api/activity/{row['id']}/capture",
                      {"Authorization": "Bearer user-key"})[0] == 401
    code, cap = daemon.get(f"/api/activity/{row['id']}/capture", headers=admin)
    assert code == 200
    assert cap["request"]["headers"]["Authorization"] == "***"
    assert "sk-in-body" not in cap["request"]["body"] and "user-key" not in json.dumps(cap)
    assert "hello from fake" in cap["response"]["body"]


def test_captures_are_off_by_default(start_swapd) -> None:
    daemon = start_swapd({"models": {"m": model(fake_cmd())}})
    post(daemon.url + CHAT, chat(False))
    row = wait_until(lambda: records(daemon), message="a row")[0]
    assert not row["captured"]
    assert daemon.get(f"/api/activity/{row['id']}/capture")[0] == 404


def test_activity_size_zero_turns_records_off_but_not_the_proxy(start_swapd) -> None:
    daemon = start_swapd({"activity": {"size": 0}, "models": {"m": model(fake_cmd())}})
    assert post(daemon.url + CHAT, chat(True))[0] == 200
    code, doc = daemon.get("/api/activity")
    assert code == 200 and doc == {"enabled": False, "capture": False, "data": []}


def test_a_browser_at_root_goes_to_the_page_and_api_clients_keep_the_404(start_swapd) -> None:
    daemon = start_swapd({"apiKeys": ["k"], "models": {"m": model(fake_cmd())}})
    conn = HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    conn.request("GET", "/", headers={"Accept": "text/html,application/xhtml+xml"})
    resp = conn.getresponse()
    assert (resp.status, resp.getheader("Location")) == (302, "/ui")
    resp.read()
    conn.request("GET", "/ui")
    resp = conn.getresponse()
    page = resp.read().decode()
    assert resp.status == 200 and "<title>swapd</title>" in page
    assert "default-src 'self'" in resp.getheader("Content-Security-Policy", "")
    for asset in ("app.js", "style.css", "favicon.svg"):
        conn.request("GET", f"/ui/{asset}")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read()
    conn.close()
    # Not a browser: the answer `/` gave before the page existed (the key check first).
    code, body = http("GET", daemon.url + "/", headers={"Authorization": "Bearer k"})
    assert code == 404 and body["error"]["code"] == "not_found"
    assert http("GET", daemon.url + "/")[0] == 401
