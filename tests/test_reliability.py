"""Reliability: load, engine faults, bad input, a fuzzed request parser, swapd's resources.

Everything is checked from the outside: the engines' own start/exit records (tests/fake_engine.py
--record), what clients receive, and /proc for swapd's file descriptors, threads and children.
The load test uses the functions of the long soak (`python -m bench.soak`, docs/reliability.md)
for a few seconds. swapd's own faults (SIGKILL and the reaping restart, SIGHUP with a broken
config, recipe writes that fail) are in tests/test_operations.py.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import math
import os
import socket
import sys
import threading
import time
from http.client import HTTPConnection
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import soak
from swapd.config.types import Config, ModelConfig
from swapd.errors import ApiError
from swapd.http import modelnames
from swapd.http.proxy import json_model, multipart_field, rewrite
from tests.support import (
    FAKE_ENGINE,
    IDLE,
    PY,
    engine_boot_seconds,
    fake_cmd,
    free_port,
    http,
    metric_value,
    model,
    multipart,
    pid_alive,
    raw_request,
    read_records,
    stream_lines,
    wait_until,
)

CHAT = "/v1/chat/completions"


def timed_post(daemon: Any, body: Any, path: str = CHAT) -> tuple[int, Any, float]:
    t0 = time.monotonic()
    code, doc = daemon.post(path, body)
    return code, doc, time.monotonic() - t0


def is_openai_error(doc: Any, code: str | None = None) -> bool:
    ok = isinstance(doc, dict) and set(doc.get("error") or {}) >= {"message", "type", "code"}
    return ok and (code is None or doc["error"]["code"] == code)


# -- load -------------------------------------------------------------------------------------


def test_load_over_three_models_loses_nothing(start_swapd, tmp_path):
    """Twenty clients, five seconds of random traffic over three models: chat, streams, clients
    that leave mid-stream, bad requests. The engines' records show one tenant at a time; every
    request got its answer from the right engine within queueTimeout; starts ≤ what the arrival
    order forces; afterwards swapd's fds, tasks, threads and children are back to baseline."""
    rec = tmp_path / "records.jsonl"
    queue_timeout = 15.0
    daemon = start_swapd(soak.swapd_config(rec, queue_timeout=queue_timeout, faults=False),
                         env=soak.instrument(tmp_path))
    pid, dump = daemon.proc.pid, tmp_path / "tasks.jsonl"
    soak.warm_up(daemon.url, soak.MODELS)
    baseline = soak.resources(pid)
    base_tasks = soak.task_names(pid, dump)

    outcomes: list[soak.Outcome] = []
    for seed in (8, 9, 10, 11):  # a loaded runner serves fewer in 5 s: drive on, not fail
        outcomes += asyncio.run(soak.drive(
            daemon.url, duration=5.0, clients=20, seed=seed, mix=soak.Mix(),
            queue_timeout=queue_timeout, tokens=6))
        if len(outcomes) >= 60:
            break

    status = daemon.status()
    assert status["queue"] == 0
    assert all(m["inflight"] == 0 for m in status["models"].values()), status
    _, tasks, resource_problems = soak.settle(daemon.url, pid, baseline, dump, base_tasks)
    records = read_records(rec)
    intervals, record_problems = soak.engine_intervals(records)
    figures = soak.summary(outcomes)
    print(json.dumps(figures), f"starts={len(intervals) - 3}",
          f"forced={soak.forced_starts(outcomes)}", f"fds={baseline.fds}",
          f"tasks={len(base_tasks)}->{len(tasks)}")

    kinds = collections.Counter(o.kind.split(":")[0] for o in outcomes)
    assert {"chat", "stream", "cut", "bad"} <= set(kinds), kinds
    assert figures["requests"] >= 60, figures
    assert record_problems == []  # every engine exited gracefully and said so
    assert soak.overlaps(intervals) == []
    assert soak.judge(outcomes, records, queue_timeout, faults=False) == []
    starts = len(intervals) - len(soak.MODELS)  # the warm-up started each model once
    assert 1 <= starts <= soak.forced_starts(outcomes)
    assert resource_problems == []


def test_queue_timeout_is_504_on_time_and_the_start_goes_on(start_swapd, tmp_path):
    rec = tmp_path / "slow.jsonl"
    cfg = {"queueTimeout": 1, "models": {
        "slow": model(fake_cmd("--boot-delay", "2.5", name="slow", record=rec))}}
    daemon = start_swapd(cfg)

    def ask(_: int) -> tuple[int, Any, float, float]:
        code, doc, took = timed_post(daemon, {"model": "slow"})
        return code, doc, took, time.time()

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(ask, range(5)))
    # On time: not before queueTimeout, and while the engine still loads (the reference, in
    # this test: its own readiness, at least 2.5 s after it was spawned).
    wait_until(lambda: [r for r in read_records(rec) if r["event"] == "ready"], timeout=20,
               message="slow engine's ready record")
    ready_at = next(r["t"] for r in read_records(rec) if r["event"] == "ready")
    for code, doc, took, at in answers:
        assert code == 504 and is_openai_error(doc, "queue_timeout"), doc
        assert took >= 0.9 and at < ready_at, (took, at, ready_at)
    # The engine was not abandoned: it comes up and serves.
    wait_until(lambda: daemon.status()["models"]["slow"]["state"] == "ready", timeout=10,
               message="slow engine ready")
    assert daemon.post(CHAT, {"model": "slow"})[0] == 200
    assert daemon.status()["models"]["slow"]["inflight"] == 0


# (A grant in the tick of the queue timeout: tests/test_decisions.py, as events.)


# -- engine faults ----------------------------------------------------------------------------


def test_engine_that_exits_or_hangs_while_starting_fails_fast(start_swapd, tmp_path):
    rec = tmp_path / "records.jsonl"
    # The hung engine must get as far as its own code before its healthCheckTimeout (else
    # nothing records its graceful exit): at least 1 s, more where a loaded runner boots a
    # Python engine slower (a reference measured here, with a wide margin).
    hang = min(20, max(1, math.ceil(4 * engine_boot_seconds(tmp_path))))
    cfg = {"healthCheckTimeout": 30, "models": {
        "dies": model(fake_cmd("--crash-after", "0", record=rec, name="dies")),
        "hangs": model(fake_cmd("--health-503-for", "60", record=rec, name="hangs"),
                       healthCheckTimeout=hang),
        "ok": model(fake_cmd(record=rec, name="ok")),
    }}
    daemon = start_swapd(cfg)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        dies = list(pool.map(lambda _: timed_post(daemon, {"model": "dies"}), range(3)))
    for code, doc, took in dies:  # every waiter gets the failure, at once
        assert code == 503 and is_openai_error(doc, "engine_start_failed"), doc
        assert "exited with code 3" in doc["error"]["message"]
        # the engine's last line, as a crash's message has it (issue 22); the rest: /logs
        assert "last output: fatal: simulated crash" in doc["error"]["message"]
        assert took < 5, took
    code, doc, took = timed_post(daemon, {"model": "hangs"})
    assert code == 503 and f"not ready after {hang}s" in doc["error"]["message"], doc
    assert hang - 0.1 <= took < 30, took  # its own healthCheckTimeout, not the file-wide 30 s
    assert daemon.post(CHAT, {"model": "ok"})[0] == 200  # a failed model blocks nobody
    hung = [r for r in read_records(rec) if r["model"] == "hangs"]
    assert [r["event"] for r in hung] == ["start", "exit"]  # stopped, gracefully
    assert not pid_alive(hung[0]["pid"])


HALF_BODY_ENGINE = """
import os, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
while True:
    c, _ = s.accept()
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        data += c.recv(65536)
    if data.startswith(b"GET /health"):
        c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
        c.close()
        continue
    # 100 bytes of the 1000 promised, then death.
    c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\n"
              b"Content-Length: 1000\\r\\n\\r\\n" + b"x" * 100)
    os._exit(5)
"""


def test_engine_dying_mid_response_ends_the_response_with_an_error(start_swapd, tmp_path):
    """An event stream gets an OpenAI-shaped error event and ends; a plain body whose
    status line is gone already is cut (the client sees an incomplete body, never a
    silently truncated one, never a hang)."""
    script = tmp_path / "half_body.py"
    script.write_text(HALF_BODY_ENGINE)
    restart = {"maxRetries": 5, "backoffInitial": 0.1, "backoffMax": 0.5}
    cfg = {"models": {
        "mid": model(fake_cmd("--crash-mid-stream", "--stream-tokens", "6", name="mid"),
                     restart=restart),
        "half": model(f"{PY} {script} ${{PORT}}", restart=restart),
    }}
    daemon = start_swapd(cfg)
    for _ in range(2):  # the crash, then the restart and the same again
        # A model in crash backoff is answered 503 at once: start after it.
        wait_until(lambda: (daemon.status()["models"]["mid"]["failure"] or {}).get("retry_at")
                   is None, timeout=5, message="no backoff")
        t0 = time.monotonic()
        answer = [line for line, _ in stream_lines(daemon.url + CHAT,
                                                   {"model": "mid", "stream": True}, timeout=10)]
        lines = [line for line in answer if line.startswith("data:")]
        assert time.monotonic() - t0 < 5
        assert len(lines) == 3, answer  # two tokens, then the error
        assert is_openai_error(json.loads(lines[-1][5:]), "engine_error"), lines[-1]

        def crash_noticed() -> bool:
            # Recorded as a failure too: else the next round's "no backoff" could pass
            # before the backoff began, and its request meet it (503, no stream).
            mid = daemon.status()["models"]["mid"]
            return mid["state"] != "ready" and mid["failure"] is not None

        wait_until(crash_noticed, timeout=5, message="crash noticed")

    async def plain() -> str:
        async with aiohttp.ClientSession() as session:
            async with session.post(daemon.url + CHAT, json={"model": "half"},
                                    timeout=aiohttp.ClientTimeout(total=10)) as resp:
                assert resp.status == 200
                try:
                    await resp.read()
                except aiohttp.ClientPayloadError as exc:
                    return str(exc)
                return "complete?"

    t0 = time.monotonic()
    assert "Not enough data" in asyncio.run(plain())
    assert time.monotonic() - t0 < 5
    # Counted under the status the clients got (200), and as stream errors.
    _, scrape = daemon.get("/metrics")
    for name, died in (("half", 1), ("mid", 2)):
        assert metric_value(scrape, "swapd_requests_total", model=name, code="200") == died
        assert metric_value(scrape, "swapd_requests_total", model=name, code="502") == 0
        assert metric_value(scrape, "swapd_stream_errors_total", model=name) == died


class Squatter:
    """Something else holding a port: a bare listener (never answers), or an HTTP server that
    answers every path with 200."""

    def __init__(self, answers: bool, port: int | None = None) -> None:
        self.port = port or free_port()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(64)
        self.conns: list[socket.socket] = []
        self.served = 0
        self.probed = 0
        self._stop = False
        if answers:
            threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(2)
                try:
                    data = conn.recv(65536)
                    if not data.startswith(b"GET /health"):
                        self.served += 1
                    else:
                        self.probed += 1
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 17\r\nConnection: close\r\n\r\n"
                                 b'{"squatter":true}')
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def test_port_already_taken(start_swapd, tmp_path):
    """Something already listens on a model's port: a bare listener, or one that answers every
    path with 200. The start fails at once, before any engine is spawned, with an error naming
    the pid that holds the port; the squatter never sees a request; other models are fine."""
    bare, answering = Squatter(answers=False), Squatter(answers=True)
    rec = tmp_path / "rec.jsonl"
    try:
        def on(port: int, name: str) -> dict[str, Any]:
            cmd = f"{PY} {FAKE_ENGINE} --port {port} --model-name {name} --record {rec}"
            return {"cmd": cmd, "proxy": f"http://127.0.0.1:{port}",
                    "restart": {"maxRetries": 1, "backoffInitial": 0.2, "backoffMax": 3.0}}

        cfg = {"healthCheckTimeout": 10, "models": {
            "bare": on(bare.port, "bare"), "squat": on(answering.port, "squat"),
            "ok": model(fake_cmd(name="ok"))}}
        daemon = start_swapd(cfg)
        # The reference for "at once": what starting an engine takes on this machine now.
        code, _, start_took = timed_post(daemon, {"model": "ok", "messages": []})
        assert code == 200
        for name, squatter in (("bare", bare), ("squat", answering)):
            code, doc, took = timed_post(daemon, {"model": name, "messages": []})
            assert code == 503, doc
            message = doc["error"]["message"]
            assert f"port {squatter.port} is already in use by pid {os.getpid()}" in message, doc
            assert took < start_took, f"refused after {took:.2f}s (a start: {start_took:.2f}s)"
        assert answering.served == 0  # no prompt reached the squatter
        assert not [e for e in read_records(rec) if e["event"] == "start"]  # nothing spawned
        assert daemon.post(CHAT, {"model": "ok"})[0] == 200
        assert "engine port taken" in daemon.log()
    finally:
        bare.close()
        answering.close()


def test_a_recipe_that_never_names_its_port_fronts_a_server_it_does_not_run(start_swapd):
    """A placeholder `cmd` in front of an always-on server (a llama-swap pattern): the port
    is not the engine's, since the engine is never told it, so the server already on it is
    the upstream, not a squatter. A recipe that names the port still gets the check above."""
    server = Squatter(answers=True)
    try:
        daemon = start_swapd({"models": {"ext": {
            "cmd": f"{PY} -c '{IDLE}'",
            "proxy": f"http://127.0.0.1:{server.port}"}}})
        code, doc = daemon.post(CHAT, {"model": "ext", "messages": []})
        assert code == 200 and doc == {"squatter": True}, doc
        assert server.served == 1
    finally:
        server.close()


def test_squatter_that_binds_while_the_engine_loads_gets_no_prompt(start_swapd, tmp_path):
    """The port was free when the engine was spawned, but a squatter binds it while the engine
    loads (vLLM opens its port only after loading): the squatter answers the readiness probe,
    yet that answer does not count (the listening socket is not in the engine's process tree).
    The engine then cannot bind and exits; the error names the squatter's pid, and no user
    request ever reaches it."""
    port = free_port()
    rec = tmp_path / "rec.jsonl"
    cmd = f"{PY} {FAKE_ENGINE} --port {port} --model-name late --boot-delay 3 --record {rec}"
    daemon = start_swapd({"healthCheckTimeout": 20, "models": {
        "late": {"cmd": cmd, "proxy": f"http://127.0.0.1:{port}",
                 "restart": {"maxRetries": 0}}}})
    squatter: list[Squatter] = []

    def squat() -> None:
        wait_until(lambda: any(e["event"] == "start" for e in read_records(rec)), timeout=15,
                   message="the engine spawned")
        squatter.append(Squatter(answers=True, port=port))

    thread = threading.Thread(target=squat)
    thread.start()
    try:
        code, doc, _ = timed_post(daemon, {"model": "late", "messages": []})
        thread.join()
        assert code == 503, doc
        message = doc["error"]["message"]
        assert "exited with code 1" in message, doc
        assert f"port {port} is held by pid {os.getpid()}" in message, doc
        assert squatter[0].probed > 0  # it did answer the readiness probe
        assert squatter[0].served == 0  # and never got a prompt
        assert "readiness answer from a socket that is not the engine's" in daemon.log()
    finally:
        thread.join()
        for s in squatter:
            s.close()


def test_flapping_readiness_endpoint(start_swapd, tmp_path):
    """/health alternating 503 and 200: the first 200 makes it ready; later flaps (swapd does
    not probe a ready engine) neither restart it nor fail a request."""
    rec = tmp_path / "records.jsonl"
    cfg = {"models": {"flappy": model(fake_cmd("--health-flap", "0.3", record=rec,
                                               name="flappy"))}}
    daemon = start_swapd(cfg)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: daemon.post(CHAT, {"model": "flappy"})[0], range(6)))
    assert codes == [200] * 6
    deadline = time.monotonic() + 1.0  # a few flaps more
    while time.monotonic() < deadline:
        assert daemon.post(CHAT, {"model": "flappy"})[0] == 200
    assert [r["event"] for r in read_records(rec)] == ["start", "ready"]
    assert daemon.status()["models"]["flappy"]["state"] == "ready"


CRASH_TWICE = """
import os, sys
counter, fake, *args = sys.argv[1:]
n = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
open(counter, "w").write(str(n))
extra = ["--crash-after", "0"] if n <= 2 else []
os.execv(sys.executable, [sys.executable, fake, *args, *extra])
"""


def test_crash_loop_backs_off_then_503_then_recovers(start_swapd, tmp_path):
    """An engine that dies at its first two starts, maxRetries 1: failed after the first
    failure, then 503 (no Retry-After) and no start until the cool-down (backoffMax) ends;
    the retry fails once more, the next one works."""
    wrapper, counter = tmp_path / "crash_twice.py", tmp_path / "starts"
    wrapper.write_text(CRASH_TWICE)
    cmd = f"{PY} {wrapper} {counter} {FAKE_ENGINE} --port ${{PORT}} --model-name loop"
    cfg = {"models": {"loop": model(cmd, restart={
        "maxRetries": 1, "backoffInitial": 0.2, "backoffMax": 0.5})}}
    daemon = start_swapd(cfg)
    code, doc = daemon.post(CHAT, {"model": "loop"})
    assert code == 503 and "exited with code 3" in doc["error"]["message"], doc
    assert daemon.status()["models"]["loop"]["state"] == "failed"
    code, headers, doc = _post_with_headers(daemon.url + CHAT, {"model": "loop"})
    assert code == 503 and is_openai_error(doc, "engine_start_failed"), doc
    assert "is failed after 1 failure" in doc["error"]["message"]
    # A failed start is no wait: no Retry-After, and SDKs told not to retry.
    assert "retry-after" not in headers and headers["x-should-retry"] == "false"
    assert counter.read_text() == "1"  # refused without another start

    results: list[int] = []

    def recovered() -> bool:
        results.append(daemon.post(CHAT, {"model": "loop"})[0])
        return results[-1] == 200

    wait_until(recovered, timeout=5, interval=0.1, message="recovery after the backoff")
    assert set(results[:-1]) <= {503} and counter.read_text() == "3"
    assert daemon.status()["models"]["loop"]["state"] == "ready"


def _post_with_headers(url: str, body: Any) -> tuple[int, dict[str, str], Any]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("POST", parts.path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(resp.read())
    finally:
        conn.close()


# -- bad input --------------------------------------------------------------------------------

BAD_BODIES: list[tuple[bytes, int, str]] = [
    (b"", 400, "bad_json"),
    (b"{not json", 400, "bad_json"),
    (b'{"model": "alpha", "messages": [', 400, "bad_json"),  # truncated
    (b'{"model": "alpha"', 400, "bad_json"),
    (b'{"model": "\xff\xfe"}', 400, "bad_json"),  # not UTF-8
    (b"[1, 2]", 400, "bad_json"),
    (b'"alpha"', 400, "bad_json"),
    (b"null", 400, "bad_json"),
    (b"42", 400, "bad_json"),
    (b"{}", 400, "missing_model"),
    (b'{"messages": []}', 400, "missing_model"),
    (b'{"model": 5}', 400, "missing_model"),
    (b'{"model": null}', 400, "missing_model"),
    (b'{"model": ["alpha"]}', 400, "missing_model"),
    (b'{"model": {"id": "alpha"}}', 400, "missing_model"),
    (b'{"model": ""}', 400, "missing_model"),
    (b'{"model": "nope"}', 404, "model_not_found"),
    (b'{"model": "alpha", "pad": "' + b"x" * 5000 + b'"}', 413, "body_too_large"),
]


def test_bad_input_gets_its_error_and_leaves_other_clients_alone(start_swapd, tmp_path):
    cfg = {"maxBodyBytes": 4096, "models": {
        "alpha": model(fake_cmd("--stream-tokens", "40", "--token-delay", "0.05",
                                name="alpha"))}}
    daemon = start_swapd(cfg)
    daemon.post("/models/alpha/load")
    # A good client streaming the whole time (2 s) the bad ones are answered.
    got: list[str] = []
    first = threading.Event()

    def good_stream() -> None:
        for line, _ in stream_lines(daemon.url + CHAT, {"model": "alpha", "stream": True}):
            if line.startswith("data:"):
                got.append(line)
                first.set()

    streamer = threading.Thread(target=good_stream)
    streamer.start()
    assert first.wait(10)

    json_ct = {"Content-Type": "application/json"}
    for body, status, code in BAD_BODIES:
        got_status, doc = daemon.post(CHAT, body, headers=json_ct)
        assert (got_status, is_openai_error(doc, code)) == (status, True), (body[:40], doc)
    # A body past maxBodyBytes without Content-Length (chunked): 413 all the same.
    conn = HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    conn.request("POST", CHAT, body=iter([b'{"model": "alpha", "x": "', b"y" * 8000, b'"}']),
                 headers=json_ct, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and is_openai_error(json.loads(resp.read()), "body_too_large")
    conn.close()
    # Multipart without `model`, with `model` as a file, without a boundary.
    wav = {"file": ("a.wav", b"RIFF....", "audio/wav")}
    for fields, files in (({}, wav), ({}, {"model": ("m.txt", b"alpha", "text/plain")})):
        body, ctype = multipart(fields, files)
        code, doc = daemon.post("/v1/audio/transcriptions", body, headers={"Content-Type": ctype})
        assert code == 400 and is_openai_error(doc, "missing_model"), doc
    code, doc = daemon.post("/v1/audio/transcriptions", b"x",
                            headers={"Content-Type": "multipart/form-data"})
    assert code == 400 and is_openai_error(doc, "missing_model"), doc
    # A boundary outside latin-1 (UTF-8 on the wire) once made the parser raise: a 500.
    body = b'--\xc4\x80\r\nContent-Disposition: form-data; name="file"\r\n\r\nx\r\n--\xc4\x80--\r\n'
    answer = raw_request(daemon.port, b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
                         b"Connection: close\r\nContent-Type: multipart/form-data; "
                         b"boundary=\xc4\x80\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    head, _, doc_bytes = answer.partition(b"\r\n\r\n")
    assert b" 400 " in head.split(b"\r\n")[0], answer[:200]
    assert is_openai_error(json.loads(doc_bytes), "missing_model")
    # Unknown paths and methods, unknown models under /upstream.
    for method, path, status in (("GET", "/nope", 404), ("POST", "/v1/nope", 404),
                                 ("GET", CHAT, 405), ("POST", "/upstream/nope/x", 404)):
        code, doc = http(method, daemon.url + path, b"" if method == "POST" else None)
        assert code == status and is_openai_error(doc), (method, path, doc)

    # Malformed HTTP is refused by aiohttp's parser before swapd sees it: 400, connection closed.
    port = daemon.port
    for raw in (
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",  # > 8190
        b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(200))
        + b"\r\n",  # > 128 headers
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # request line too long
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS to a plain HTTP port
        b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    ):
        answer = raw_request(port, raw)
        assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0], answer[:80]

    streamer.join(15)
    assert got[-1] == "data: [DONE]" and len(got) == 42, got[-3:]  # 40 tokens, final, DONE
    assert daemon.post(CHAT, {"model": "alpha"})[0] == 200


def test_slow_clients_hold_nothing_and_slow_nobody(start_swapd, tmp_path):
    """Slowloris: connections dribbling half a request line of headers, or half a body. They
    take no lease (the body is read before a model is asked for), so swaps and other
    clients go on; once they leave, swapd's fds come back."""
    cfg = {"models": {"alpha": model(fake_cmd(name="alpha")),
                      "beta": model(fake_cmd(name="beta"))}}
    daemon = start_swapd(cfg)
    alone = []  # a start, then a swap, without slow clients: the reference
    for name in ("alpha", "beta"):
        code, _, took = timed_post(daemon, {"model": name})
        assert code == 200
        alone.append(took)
    assert daemon.post("/unload")[0] == 200
    baseline = soak.resources(daemon.proc.pid)

    async def scenario() -> list[tuple[str, int, float]]:
        stop = asyncio.Event()
        writers = []
        for i in range(60):
            _, w = await asyncio.open_connection("127.0.0.1", daemon.port)
            w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            if i % 2:
                w.write(b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{")
            writers.append((w, bool(i % 2)))

        async def dribble() -> None:
            while not stop.is_set():
                for w, body in writers:
                    w.write(b" " if body else b"X-Slow: 1\r\n")
                await asyncio.sleep(0.1)

        dribbler = asyncio.create_task(dribble())
        results = []
        async with aiohttp.ClientSession() as session:
            for name in ["alpha", "beta"] * 2:  # swaps under slowloris
                t0 = time.monotonic()
                async with session.post(daemon.url + CHAT, json={"model": name}) as resp:
                    doc = await resp.json()
                    results.append((doc.get("x_served_by", ""), resp.status,
                                    time.monotonic() - t0))
        st_ = await asyncio.to_thread(daemon.status)
        assert st_["queue"] == 0 and all(m["inflight"] == 0 for m in st_["models"].values())
        assert soak.resources(daemon.proc.pid).fds >= baseline.fds + 60  # all still connected
        stop.set()
        await dribbler
        for w, _ in writers:
            w.close()
        return results

    results = asyncio.run(scenario())
    for name, (served, code, took) in zip(["alpha", "beta"] * 2, results, strict=True):
        assert (served, code) == (name, 200)
        assert took < 3 * max(alone), (results, alone)
    assert daemon.post("/unload")[0] == 200
    wait_until(lambda: soak.resources(daemon.proc.pid).fds <= baseline.fds + 2, timeout=10,
               message="swapd's fds back after the slow clients left")


# -- the request parser, fuzzed --------------------------------------------------------------

FUZZ_CONFIG = Config(models={
    "alpha": ModelConfig(id="alpha", cmd=("x",), aliases=("a", "alias/one"),
                         use_model_name="alpha-upstream",
                         strip_params=("temperature", "model"),
                         set_params={"top_k": 5, "model": "ignored"}),
    "org/beta": ModelConfig(id="org/beta", cmd=("x",)),
})
KNOWN = ["alpha", "a", "alias/one", "org/beta"]
FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
model_names = st.sampled_from(KNOWN) | st.text(max_size=12)


def _route(body: bytes) -> tuple[str, Any] | ApiError | modelnames.Unroutable:
    """What the inference handler does with a JSON body: `json_model`, then the name
    through `modelnames.resolve` (profile pin, selector, local name, peer)."""
    try:
        data, name = json_model(body)
        where, _ = modelnames.resolve(FUZZ_CONFIG, None, name, None)
    except ApiError as exc:
        assert exc.status == 400 and exc.message and exc.code, exc
        return exc
    except modelnames.Unroutable as exc:
        assert exc.status == 404 and exc.message and exc.code == "model_not_found", exc
        return exc
    assert isinstance(where, modelnames.Local)
    return where.model.id, data


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_request_model_bytes(body):
    _route(body)  # never anything but ApiError or Unroutable


@FUZZ
@given(json_values, st.one_of(st.none(), model_names, json_values))
def test_fuzz_request_model_documents(doc, name):
    if isinstance(doc, dict) and name is not None:
        doc = {**doc, "model": name}
    body = json.dumps(doc).encode()
    result = _route(body)
    if not isinstance(doc, dict):
        assert isinstance(result, ApiError) and result.code == "bad_json"
    elif not isinstance(doc.get("model"), str) or not doc["model"]:
        assert isinstance(result, ApiError) and result.code == "missing_model"
    elif FUZZ_CONFIG.resolve(doc["model"]) is None:
        assert isinstance(result, modelnames.Unroutable) and result.status == 404
    else:
        assert result == (FUZZ_CONFIG.resolve(doc["model"]).id, doc)  # type: ignore[union-attr]


@FUZZ
@given(st.binary(max_size=512), st.text(max_size=40), st.text(max_size=10))
def test_fuzz_multipart_field_never_raises(body, boundary, name):
    for ctype in (f"multipart/form-data; boundary={boundary}", f"multipart/form-data;{boundary}",
                  f'multipart/form-data; boundary="{boundary}"'):
        value = multipart_field(body, ctype, name)
        assert value is None or isinstance(value, str)


field_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n-"),
                     min_size=1, max_size=30)


@FUZZ
@given(field_text, st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True), field_text,
                                   max_size=3), st.binary(max_size=200))
def test_fuzz_multipart_finds_the_model_field(value, others, payload):
    body, ctype = multipart({**others, "model": value},
                            {"file": ("a.bin", payload.replace(b"--swapd", b""), "audio/wav")})
    assert multipart_field(body, ctype, "model") == value


@FUZZ
@given(st.dictionaries(st.text(max_size=12), json_values, max_size=6), model_names)
def test_fuzz_rewrite(data, requested):
    for cfg in FUZZ_CONFIG.models.values():
        doc = dict(data)
        changed = rewrite(cfg, doc, requested)
        upstream = cfg.use_model_name or cfg.id
        if requested != upstream:
            assert changed and doc["model"] == upstream
        assert not any(k in doc for k in cfg.strip_params if k != "model")
        for key, value in (cfg.set_params or {}).items():
            if key != "model":
                assert doc[key] == value
        json.dumps(doc)  # still serialisable


@pytest.mark.skipif(sys.platform != "linux", reason="/proc")
def test_resources_helper_sees_zombies(tmp_path):
    """The zombie check itself works: a child that exited and was not waited for."""
    import subprocess

    child = subprocess.Popen([PY, "-c", "pass"])
    wait_until(lambda: child.pid in soak.resources(os.getpid()).zombies, timeout=5,
               message="an unreaped child shows as a zombie")
    child.wait()
    assert child.pid not in soak.resources(os.getpid()).zombies
