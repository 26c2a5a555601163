"""The daemon's core promises, end to end: a real swapd process, real fake engines, the
official `openai` client. Overlap and orphan checks use the engines' own records
and /proc, never swapd's word for it."""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import signal
import threading
from pathlib import Path

import openai
import pytest

from tests.support import (
    fake_cmd,
    http,
    model,
    multipart,
    pid_alive,
    read_records,
    stream_lines,
    wait_until,
)


def client(daemon, **kw) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=kw.pop("api_key", "none"),
                         max_retries=0, timeout=60, **kw)


def two_models(tmp_path: Path, *flags_a: str, **extra: object) -> dict[str, object]:
    rec = tmp_path / "records.jsonl"
    return {
        "healthCheckTimeout": 30,
        "models": {
            "alpha": model(fake_cmd(*flags_a, record=rec, name="alpha"), aliases=["a"], **extra),
            "beta": model(fake_cmd(record=rec, name="beta"), useModelName="beta-upstream"),
        },
    }


def test_openai_client_chat_stream_embeddings_and_errors(start_swapd, tmp_path):
    daemon = start_swapd(two_models(tmp_path))
    c = client(daemon)

    chat = c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == "hello from alpha"

    chunks = list(c.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "hi"}], stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert len(chunks) >= 5 and text

    emb = c.embeddings.create(model="alpha", input=["x", "y"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 8

    listed = {m.id for m in c.models.list().data}
    assert {"alpha", "beta"} <= listed

    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 404
    assert "nope" in err.value.body["message"]  # type: ignore[index]

    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}])


def test_alias_and_use_model_name_rewrite_upstream_model(start_swapd, tmp_path):
    daemon = start_swapd(two_models(tmp_path))
    code, body = daemon.post("/v1/chat/completions", {"model": "a", "messages": []})
    assert code == 200 and body["x_request"]["model"] == "alpha"
    code, body = daemon.post("/v1/chat/completions", {"model": "beta", "messages": []})
    assert code == 200 and body["x_request"]["model"] == "beta-upstream"


def test_filters_strip_and_set_params(start_swapd, tmp_path):
    cfg = two_models(tmp_path, filters={"stripParams": "temperature, top_p",
                                        "setParams": {"top_k": 7}})
    daemon = start_swapd(cfg)
    code, body = daemon.post("/v1/chat/completions", {
        "model": "alpha", "messages": [], "temperature": 2, "top_p": 0.1, "seed": 1})
    assert code == 200
    sent = body["x_request"]
    assert "temperature" not in sent and "top_p" not in sent
    assert sent["top_k"] == 7 and sent["seed"] == 1


def test_concurrent_requests_for_two_models_never_overlap(start_swapd, tmp_path):
    """Two models hammered at once: the engines' own records show no overlap."""
    daemon = start_swapd(two_models(tmp_path))
    rec = tmp_path / "records.jsonl"
    c = client(daemon)

    def ask(name: str) -> str:
        r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}])
        return r.choices[0].message.content or ""

    names = ["alpha", "beta"] * 6
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, names))
    assert answers == [f"hello from {n}" for n in names]
    daemon.post("/unload")
    events = read_records(rec)
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) >= 2
    intervals = []
    for s in starts:
        end = next((e["t"] for e in events if e["event"] == "exit" and e["pid"] == s["pid"]), None)
        assert end is not None, f"engine {s} has no exit record"
        intervals.append((s["t"], end, s["model"]))
    intervals.sort()
    for (_s1, e1, m1), (s2, _e2, m2) in itertools.pairwise(intervals):
        assert e1 <= s2, f"{m1} ran until {e1} but {m2} started at {s2}"
    # Queued requests for one model are served together: no swap per request.
    assert len(starts) <= 4, f"{len(starts)} engine starts for 12 requests: thrashing"


def test_sigterm_ignoring_engine_is_sigkilled_after_grace(start_swapd, tmp_path):
    cfg = two_models(tmp_path, "--ignore-sigterm", "--spawn-grandchild", unloadTimeout=1)
    daemon = start_swapd(cfg)
    assert daemon.post("/v1/chat/completions", {"model": "alpha", "messages": []})[0] == 200
    st = daemon.status()["models"]["alpha"]
    pid = st["pid"]
    grandchildren = [int(line.split()[-1]) for line in daemon.get("/logs")[1].splitlines()
                     if "grandchild pid" in line]
    assert grandchildren
    code, _ = daemon.post("/v1/chat/completions", {"model": "beta", "messages": []})
    assert code == 200
    assert not pid_alive(pid)
    assert not any(pid_alive(g) for g in grandchildren)
    _, metrics = daemon.get("/metrics")
    assert 'swapd_engine_kills_total{model="alpha"} 1.0' in metrics


def test_grandchild_never_outlives_its_engine_on_unload(start_swapd, tmp_path):
    daemon = start_swapd(two_models(tmp_path, "--spawn-grandchild"))
    assert daemon.post("/v1/chat/completions", {"model": "alpha", "messages": []})[0] == 200
    grandchild = int(next(line for line in daemon.get("/logs")[1].splitlines()
                          if "grandchild pid" in line).split()[-1])
    assert pid_alive(grandchild)
    code, _ = daemon.post("/models/alpha/unload")
    assert code == 200
    assert not pid_alive(grandchild)


def test_start_failure_reports_exit_code_and_last_lines(start_swapd, tmp_path):
    daemon = start_swapd(two_models(tmp_path, "--crash-after", "0"))
    code, body = daemon.post("/v1/chat/completions", {"model": "alpha", "messages": []})
    assert code == 503
    msg = body["error"]["message"]
    # The client learns the exit code and the engine's last line (masked and bounded, as a
    # crash's message has it: issue 22); the rest is for the operator (/logs).
    assert "exited with code 3" in msg and "/logs/stream/alpha" in msg
    assert "last output: fatal: simulated crash" in msg
    assert "simulated crash" in daemon.get("/logs")[1]
    last = daemon.status()["models"]["alpha"]["last_exit"]
    assert any("simulated crash" in line for line in last["last_lines"])
    # A failed model never blocks the others.
    assert daemon.post("/v1/chat/completions", {"model": "beta", "messages": []})[0] == 200


def test_health_timeout_fails_start_at_once(start_swapd, tmp_path):
    cfg = two_models(tmp_path, "--health-503-for", "60")
    cfg["models"]["alpha"]["healthCheckTimeout"] = 1  # type: ignore[index]
    daemon = start_swapd(cfg)
    code, body = daemon.post("/v1/chat/completions", {"model": "alpha", "messages": []})
    assert code == 503 and "not ready after 1s" in body["error"]["message"]
    assert daemon.status()["models"]["alpha"]["pid"] is None


def test_crash_mid_request_gives_502_and_next_request_restarts(start_swapd, tmp_path):
    cfg = two_models(tmp_path, "--crash-after", "2")
    cfg["models"]["alpha"]["restart"] = {"maxRetries": 3, "backoffInitial": 0.05}  # type: ignore[index]
    daemon = start_swapd(cfg)
    assert daemon.post("/v1/chat/completions", {"model": "alpha", "messages": []})[0] == 200
    code, body = daemon.post("/v1/chat/completions", {"model": "alpha", "messages": []})
    assert code in (200, 502)
    wait_until(lambda: daemon.status()["models"]["alpha"]["state"] != "ready", timeout=10,
               message="crash noticed")
    assert "engine crashed" in daemon.log()
    # A new request is answered 503 while the crash's backoff (0.05 s) runs: wait it out.
    wait_until(lambda: (m := daemon.status()["models"]["alpha"])["state"] == "stopped"
               and m["failure"]["count"] == 1 and m["failure"]["retry_at"] is None,
               timeout=10, message="backoff over")
    code, body = daemon.post("/v1/chat/completions", {"model": "alpha", "messages": []})
    assert code == 200, body
    _, metrics = daemon.get("/metrics")
    assert 'swapd_engine_stops_total{model="alpha",reason="crash"} 1.0' in metrics


def test_streaming_relayed_chunk_by_chunk(start_swapd, tmp_path):
    cfg = two_models(tmp_path, "--stream-tokens", "4", "--token-delay", "0.3")
    daemon = start_swapd(cfg)
    daemon.post("/models/alpha/load")
    import time
    arrivals = []
    for line, headers in stream_lines(daemon.url + "/v1/chat/completions",
                                      {"model": "alpha", "messages": [], "stream": True}):
        assert headers["x-accel-buffering"] == "no"
        if line.startswith("data:"):
            arrivals.append(time.monotonic())
    assert len(arrivals) >= 5
    # If swapd buffered, every chunk would arrive at once at the end.
    assert arrivals[-1] - arrivals[0] >= 0.6


def test_client_disconnect_cancels_upstream(start_swapd, tmp_path):
    cfg = two_models(tmp_path, "--stream-tokens", "200", "--token-delay", "0.05")
    daemon = start_swapd(cfg)
    lines = stream_lines(daemon.url + "/v1/chat/completions",
                         {"model": "alpha", "messages": [], "stream": True})
    for i, _ in enumerate(lines):
        if i > 3:
            break
    lines.close()  # the client goes away mid-stream
    wait_until(lambda: "stream cancelled" in daemon.get("/logs")[1],
               timeout=10, message="engine saw the disconnect")
    wait_until(lambda: daemon.status()["models"]["alpha"]["inflight"] == 0, timeout=5,
               message="lease released")


def test_idle_ttl_evicts_after_last_request(start_swapd, tmp_path):
    cfg = two_models(tmp_path, ttl=1)
    daemon = start_swapd(cfg)
    assert daemon.post("/v1/chat/completions", {"model": "alpha", "messages": []})[0] == 200
    pid = daemon.status()["models"]["alpha"]["pid"]
    wait_until(lambda: daemon.status()["models"]["alpha"]["state"] == "stopped", timeout=10,
               message="idle eviction")
    assert not pid_alive(pid)
    _, metrics = daemon.get("/metrics")
    assert 'swapd_engine_stops_total{model="alpha",reason="idle"} 1.0' in metrics
    # And it comes back on demand.
    assert daemon.post("/v1/chat/completions", {"model": "alpha", "messages": []})[0] == 200


def test_ttl_never_evicts_during_a_long_stream(start_swapd, tmp_path):
    cfg = two_models(tmp_path, "--stream-tokens", "12", "--token-delay", "0.2", ttl=1)
    daemon = start_swapd(cfg)
    lines = [line for line, _ in stream_lines(daemon.url + "/v1/chat/completions",
                                              {"model": "alpha", "messages": [], "stream": True})
             if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"  # 2.4 s stream, ttl 1 s: not cut
    assert "engine exited" not in daemon.log()


def test_concurrency_limit_gives_429(start_swapd, tmp_path):
    cfg = two_models(tmp_path, concurrencyLimit=1)
    daemon = start_swapd(cfg)
    daemon.post("/models/alpha/load")
    slow = threading.Thread(target=lambda: http(
        "POST", daemon.url + "/upstream/alpha/slow?seconds=2", b"", timeout=10))
    slow.start()
    wait_until(lambda: daemon.status()["models"]["alpha"]["inflight"] == 1, message="in flight")
    code, body = daemon.post("/v1/chat/completions", {"model": "alpha", "messages": []})
    slow.join()
    assert code == 429 and body["error"]["type"] == "rate_limit_error"


def test_queue_full_and_queue_timeout(start_swapd, tmp_path):
    cfg = two_models(tmp_path, "--boot-delay", "3")
    cfg["maxQueue"] = 1
    cfg["queueTimeout"] = 1
    daemon = start_swapd(cfg)
    results: list[tuple[int, object]] = []
    t = threading.Thread(target=lambda: results.append(
        daemon.post("/v1/chat/completions", {"model": "alpha", "messages": []})))
    t.start()
    wait_until(lambda: daemon.status()["queue"] == 1, message="one queued")
    code, body = daemon.post("/v1/chat/completions", {"model": "alpha", "messages": []})
    assert code == 503 and body["error"]["code"] == "queue_full"
    t.join()
    assert results[0][0] == 504


def test_bad_requests_get_openai_errors(start_swapd, tmp_path):
    cfg = two_models(tmp_path)
    cfg["maxBodyBytes"] = 1000
    daemon = start_swapd(cfg)
    for body, code in [(b"{not json", 400), (b"[1,2]", 400), (b'{"model": 5}', 400),
                       (b'{"messages": []}', 400), (b"x" * 5000, 413)]:
        got, doc = daemon.post("/v1/chat/completions", body,
                               headers={"Content-Type": "application/json"})
        assert got == code, (body[:20], doc)
        assert set(doc["error"]) >= {"message", "type", "code"}
    got, doc = daemon.get("/no/such/path")
    assert got == 404 and "error" in doc


def test_multipart_model_field_routes(start_swapd, tmp_path):
    daemon = start_swapd(two_models(tmp_path))
    files = {"file": ("a.wav", b"RIFF....", "audio/wav")}
    body, ctype = multipart({"model": "beta"}, files)
    code, doc = daemon.post("/v1/audio/transcriptions", body, headers={"Content-Type": ctype})
    assert code == 200 and doc["path"] == "/v1/audio/transcriptions"
    assert "RIFF" in doc["body"]
    body, ctype = multipart({}, files)
    code, doc = daemon.post("/v1/audio/transcriptions", body, headers={"Content-Type": ctype})
    assert code == 400 and doc["error"]["code"] == "missing_model"


def test_api_keys_and_admin_loopback(start_swapd, tmp_path):
    cfg = two_models(tmp_path)
    cfg["apiKeys"] = ["sk-good"]
    cfg["adminKeys"] = ["adm"]
    daemon = start_swapd(cfg)
    with pytest.raises(openai.AuthenticationError):
        client(daemon, api_key="sk-bad").models.list()
    assert client(daemon, api_key="sk-good").models.list().data
    code, _ = daemon.post("/v1/chat/completions", {"model": "alpha", "messages": []},
                          headers={"x-api-key": "sk-good"})
    assert code == 200
    assert daemon.get("/health")[0] == 200 and daemon.get("/metrics")[0] == 200
    assert daemon.get("/running")[0] == 401
    assert daemon.get("/running", headers={"Authorization": "Bearer adm"})[0] == 200


def test_upstream_passthrough_starts_cold_model(start_swapd, tmp_path):
    daemon = start_swapd(two_models(tmp_path))
    code, body = daemon.post("/upstream/beta/some/path?x=1", b"raw")
    assert code == 200 and body["path"] == "/some/path" and body["body"] == "raw"


def test_gpu_false_model_runs_beside_the_tenant(start_swapd, tmp_path):
    cfg = two_models(tmp_path)
    cfg["models"]["helper"] = model(fake_cmd(name="helper"), gpu=False)  # type: ignore[index]
    daemon = start_swapd(cfg)
    for name in ("alpha", "helper", "beta"):
        assert daemon.post("/v1/chat/completions", {"model": name, "messages": []})[0] == 200
    running = {r["model"] for r in daemon.get("/running")[1]["running"]}
    assert running == {"helper", "beta"}


def test_group_without_swap_keeps_members_together(start_swapd, tmp_path):
    cfg = two_models(tmp_path)
    cfg["groups"] = {"pair": {"swap": False, "exclusive": True, "members": ["alpha", "beta"]}}
    daemon = start_swapd(cfg)
    for name in ("alpha", "beta", "alpha"):
        assert daemon.post("/v1/chat/completions", {"model": name, "messages": []})[0] == 200
    assert {r["model"] for r in daemon.get("/running")[1]["running"]} == {"alpha", "beta"}


def test_preload_hook_starts_model(start_swapd, tmp_path):
    cfg = two_models(tmp_path)
    cfg["hooks"] = {"on_startup": {"preload": ["beta"]}}
    daemon = start_swapd(cfg)
    wait_until(lambda: daemon.status()["models"]["beta"]["state"] == "ready", timeout=15,
               message="preload")


def test_sigterm_drains_and_stops_every_engine(start_swapd, tmp_path):
    daemon = start_swapd(two_models(tmp_path, "--spawn-grandchild"))
    daemon.post("/models/alpha/load")
    pid = daemon.status()["models"]["alpha"]["pid"]
    grandchild = int(next(line for line in daemon.get("/logs")[1].splitlines()
                          if "grandchild pid" in line).split()[-1])
    daemon.signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    assert not pid_alive(pid) and not pid_alive(grandchild)


def test_check_command(tmp_path):
    import subprocess
    import sys
    good = tmp_path / "good.yaml"
    good.write_text("models:\n  m:\n    cmd: llama-server --port ${PORT}\n    ttl: 5\n")
    r = subprocess.run([sys.executable, "-m", "swapd", "check", "--config", str(good)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "llama-server" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text('models:\n  qwen:\n    cmd: x\n    ttl: "abc"\n')
    for argv in (["check", "--config", str(bad)], ["--config", str(bad)]):
        r = subprocess.run([sys.executable, "-m", "swapd", *argv], capture_output=True, text=True)
        assert r.returncode == 2
        assert "models.qwen.ttl" in r.stderr and str(bad) in r.stderr


def test_engine_env_has_recipe_vars_and_no_systemd_vars(start_swapd, tmp_path):
    dump = tmp_path / "env.json"
    cfg = two_models(tmp_path, "--env-dump", str(dump), env=["FOO=bar"])
    daemon = start_swapd(cfg, env={"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1"})
    assert daemon.post("/v1/chat/completions", {"model": "alpha", "messages": []})[0] == 200
    import json
    env = json.loads(dump.read_text())
    assert env["FOO"] == "bar"
    assert "NOTIFY_SOCKET" not in env and "WATCHDOG_USEC" not in env
    assert os.environ.get("PATH") == env.get("PATH")


def test_send_loading_state_streams_progress_while_cold(start_swapd, tmp_path):
    cfg = two_models(tmp_path, "--boot-delay", "1.5", sendLoadingState=True)
    daemon = start_swapd(cfg)
    events = [line for line, _ in stream_lines(daemon.url + "/v1/chat/completions",
                                               {"model": "alpha", "messages": [], "stream": True})
              if line.startswith("data:")]
    import json
    chunks = [json.loads(e[5:]) for e in events if e != "data: [DONE]"]
    reasoning = [c["choices"][0]["delta"].get("reasoning_content") for c in chunks]
    assert any(r and "loading alpha" in r for r in reasoning)
    assert any(c["choices"][0]["delta"].get("content") for c in chunks)
    assert events[-1] == "data: [DONE]"


def test_engine_death_before_body_is_an_openai_502(start_swapd, tmp_path):
    cfg = two_models(tmp_path, "--crash-after", "1", "--crash-before-answer")
    daemon = start_swapd(cfg)
    code, body = daemon.post("/v1/chat/completions", {"model": "alpha", "messages": []})
    assert code == 502
    assert body["error"]["code"] == "engine_error" and "alpha" in body["error"]["message"]


def test_anthropic_stream_death_ends_with_an_error_event(start_swapd, tmp_path):
    daemon = start_swapd(two_models(tmp_path, "--crash-mid-stream", "--stream-tokens", "6"))
    lines = [line for line, _ in stream_lines(daemon.url + "/v1/messages",
                                              {"model": "alpha", "messages": [], "stream": True,
                                               "max_tokens": 8})]
    assert "event: error" in lines
    data = lines[lines.index("event: error") + 1]
    assert '"type": "error"' in data and "failed mid-response" in data
