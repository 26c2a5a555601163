"""Issue 12's failure rules end to end, with the official openai client (retries on, its
default max_retries=2) against a real swapd and real fake-engine processes:

- a model in backoff answers 503 at once, without Retry-After and with `x-should-retry:
  false`, so that SDK clients fail at once (issue 22: a failed start is no wait);
- a model that failed may not stop a busy tenant: the tenant keeps its engine (same pid);
- /status, /v1/models and `swapd status` show the failure, its count and the next try.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from http.client import HTTPConnection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest

from tests.support import PY, fake_cmd, model, read_records, stream_lines, wait_until

CHAT = "/v1/chat/completions"


def config(tmp_path: Path) -> dict[str, Any]:
    rec = tmp_path / "records.jsonl"
    return {
        "healthCheckTimeout": 30,
        "models": {
            # 20 tokens, 0.2 s apart: a request that stays in flight for ~4 s.
            "alpha": model(fake_cmd("--stream-tokens", "20", "--token-delay", "0.2",
                                    record=rec, name="alpha")),
            "crashy": model(fake_cmd("--crash-after", "0", record=rec, name="crashy"),
                            restart={"maxRetries": 3, "backoffInitial": 1, "backoffMax": 4}),
        },
    }


def crashy_starts(tmp_path: Path) -> int:
    return sum(1 for r in read_records(tmp_path / "records.jsonl")
               if r["event"] == "start" and r["model"] == "crashy")


def raw_post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any, float]:
    parts = urlsplit(url)
    conn = HTTPConnection(parts.hostname, parts.port, timeout=30)
    t0 = time.monotonic()
    try:
        conn.request("POST", parts.path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, doc, time.monotonic() - t0
    finally:
        conn.close()


def test_broken_model_never_costs_a_busy_tenant_its_engine(start_swapd, tmp_path) -> None:
    daemon = start_swapd(config(tmp_path))
    url = daemon.url + CHAT

    # First failure: crashy is now in backoff for 1 s. What a start costs on this machine now
    # (an engine spawned, its exit seen) is the reference "at once" is measured against.
    code, _, doc, start_took = raw_post(url, {"model": "crashy", "messages": []})
    at_once = start_took / 2
    assert code == 503 and "exited with code 3" in doc["error"]["message"], doc
    # In backoff: refused at once, no Retry-After, the next try in the message; no start.
    before = daemon.status()["models"]["crashy"]["failure"]
    code, headers, doc, took = raw_post(url, {"model": "crashy", "messages": []})
    assert code == 503 and doc["error"]["code"] == "engine_start_failed", doc
    assert took < at_once, (took, start_took)
    assert "retry-after" not in headers and headers["x-should-retry"] == "false", headers
    assert "next start in" in doc["error"]["message"] or before["retry_in"] < 1, doc
    assert before["count"] == 1 and "exited with code 3" in before["reason"]
    assert crashy_starts(tmp_path) == 1

    # alpha is the tenant, with a long request in flight.
    assert daemon.post(CHAT, {"model": "alpha", "messages": []})[0] == 200
    pid = daemon.status()["models"]["alpha"]["pid"]
    streamed: list[str] = []

    def hold() -> None:
        for line, _ in stream_lines(url, {"model": "alpha", "messages": [], "stream": True}):
            streamed.append(line)

    holder = threading.Thread(target=hold)
    holder.start()
    wait_until(lambda: daemon.status()["models"]["alpha"]["inflight"] == 1, timeout=10,
               message="alpha's request in flight")

    # The openai client with its default retries: answered at once with 503, which it
    # does not retry (x-should-retry: false); crashy is never started, alpha never stopped.
    attempts: list[dict[str, Any]] = []

    def on_request(request: Any) -> None:
        attempts.append({"sent": time.monotonic()})

    def on_response(response: Any) -> None:
        attempts[-1].update(got=time.monotonic(), status=response.status_code,
                            retry_after=response.headers.get("retry-after"))

    hooks = {"request": [on_request], "response": [on_response]}
    with openai.DefaultHttpxClient(event_hooks=hooks) as http:
        c = openai.OpenAI(base_url=daemon.url + "/v1", api_key="none", http_client=http)
        assert c.max_retries == 2
        with pytest.raises(openai.APIStatusError) as err:
            c.chat.completions.create(model="crashy", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 503
    assert len(attempts) == 1, attempts
    assert attempts[0]["status"] == 503, attempts
    assert attempts[0]["got"] - attempts[0]["sent"] < at_once, (attempts, start_took)
    assert attempts[0]["retry_after"] is None, attempts
    assert crashy_starts(tmp_path) == 1
    holder.join(30)
    assert any("[DONE]" in line for line in streamed), streamed[-3:]
    alpha = daemon.status()["models"]["alpha"]
    assert alpha["state"] == "ready" and alpha["pid"] == pid
    alpha_events = [r["event"] for r in read_records(tmp_path / "records.jsonl")
                    if r["model"] == "alpha"]
    assert alpha_events.count("start") == 1 and "exit" not in alpha_events


def test_failure_is_shown_in_status_models_and_cli(start_swapd, tmp_path) -> None:
    cfg = config(tmp_path)
    cfg["models"]["crashy"]["restart"] = {"maxRetries": 1, "backoffInitial": 1, "backoffMax": 30}
    daemon = start_swapd(cfg)
    assert daemon.post(CHAT, {"model": "crashy", "messages": []})[0] == 503
    status = daemon.status()["models"]["crashy"]
    assert status["state"] == "failed"
    failure = status["failure"]
    assert failure["count"] == 1 and "exited with code 3" in failure["reason"]
    assert 25 < failure["retry_in"] <= 30 and failure["retry_at"] > time.time() + 25
    code, models = daemon.get("/v1/models")
    entry = next(m for m in models["data"] if m["id"] == "crashy")
    assert entry["state"] == "failed" and entry["failure"]["count"] == 1
    out = subprocess.run([PY, "-m", "swapd", "status", "--url", daemon.url],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "crashy: failed 1 time" in out.stdout and "exited with code 3" in out.stdout, out.stdout
    # Refused until the cool-down ends, without a start …
    assert daemon.post(CHAT, {"model": "crashy", "messages": []})[0] == 503
    assert crashy_starts(tmp_path) == 1
    # … or until an admin load clears it (and tries again at once).
    code, doc = daemon.post("/models/crashy/load")
    assert code == 503 and "exited with code 3" in doc["error"]["message"], doc
    assert crashy_starts(tmp_path) == 2
