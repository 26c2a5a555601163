"""One tenant across two nodes (issue 24, docs/two-sparks.md): two real swapd daemons on
loopback, a Ray head stand-in under node 1 (ready only once its worker is connected) and a
worker stand-in under node 2 (tests/ray_standin.py). Every rule of the issue, end to end."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support import (
    PY,
    Swapd,
    fake_cmd,
    free_port,
    http,
    metric_value,
    model,
    pid_alive,
    read_records,
    wait_until,
)

STANDIN = Path(__file__).resolve().parent / "ray_standin.py"
KEY2 = "node2-admin-key"
ADMIN2 = {"Authorization": f"Bearer {KEY2}"}
HOLD_TTL = 3.0


def chat(node: Swapd, name: str, timeout: float = 60) -> tuple[int, Any]:
    return node.post("/v1/chat/completions", {
        "model": name, "messages": [{"role": "user", "content": "hi"}]}, timeout=timeout)


@dataclass
class Pair:
    node1: Swapd
    node2: Swapd
    rec1: Path  # the head stand-in's records
    rec2: Path  # the worker stand-in's records

    def pids(self, path: Path, side: str) -> list[int]:
        return [r["pid"] for r in read_records(path) if r["event"] == "start"
                and r["side"] == side]

    def head_pid(self) -> int:
        return wait_until(lambda: self.pids(self.rec1, "head")[-1:], message="head")[0]

    def worker_pid(self) -> int:
        return wait_until(lambda: self.pids(self.rec2, "worker")[-1:], message="worker")[0]

    def holds(self) -> list[dict[str, Any]]:
        code, doc = self.node2.get("/api/cluster/holds", headers=ADMIN2)
        assert code == 200, doc
        return doc["holds"]  # type: ignore[no-any-return]


def node2_config(gcs: int, rec2: Path, **extra: Any) -> dict[str, Any]:
    worker = model(f"{PY} {STANDIN} worker --gcs 127.0.0.1:{gcs} --record {rec2}",
                   clusterWorker=True, checkEndpoint="none", unloadTimeout=3)
    return {"adminKeys": [KEY2], "apiKeys": ["node2-api-key"], "queueTimeout": 5,
            "models": {"big-worker": worker, "local": model(fake_cmd(name="local"))}, **extra}


def node1_config(port2: int, gcs: int, rec1: Path, **extra: Any) -> dict[str, Any]:
    head = model(f"{PY} {STANDIN} head --port ${{PORT}} --gcs-port {gcs} --workers 1 "
                 f"--record {rec1}", healthCheckTimeout=30, unloadTimeout=3,
                 restart={"maxRetries": 3, "backoffInitial": 2, "backoffMax": 10},
                 cluster={"nodes": {"node2": "big-worker"}, "holdTtl": HOLD_TTL})
    return {"peers": {"node2": {"proxy": f"http://127.0.0.1:{port2}", "apiKey": KEY2}},
            "models": {"big": head, "small": model(fake_cmd(name="small"))}, **extra}


@pytest.fixture
def pair(start_swapd: Callable[..., Swapd], tmp_path: Path) -> Iterator[Pair]:
    gcs = free_port()
    rec1, rec2 = tmp_path / "head.jsonl", tmp_path / "worker.jsonl"
    node2 = start_swapd(node2_config(gcs, rec2), name="node2.yaml",
                        state_dir=tmp_path / "state2")
    node1 = start_swapd(node1_config(node2.port, gcs, rec1), name="node1.yaml",
                        state_dir=tmp_path / "state1")
    p = Pair(node1, node2, rec1, rec2)
    yield p
    for path, side in ((rec1, "head"), (rec2, "worker")):  # whatever a test left behind
        for pid in p.pids(path, side):
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def gone(pid: int) -> bool:
    return not pid_alive(pid)


def test_a_request_on_node1_starts_the_worker_on_node2_then_the_head(pair: Pair) -> None:
    code, body = chat(pair.node1, "big")
    assert code == 200, body
    assert "worker-" in body["choices"][0]["message"]["content"]  # TP over the worker
    worker, head = pair.worker_pid(), pair.head_pid()
    # the worker was spawned (its hold granted) before the head: by the processes' own
    # creation times (their first records race: "started" is ready for the worker)
    assert psutil.Process(worker).create_time() <= psutil.Process(head).create_time()
    # seen as one: the head's nodes on node 1, the hold and its holder on node 2
    big = pair.node1.status()["models"]["big"]
    assert big["cluster"]["role"] == "head"
    assert big["cluster"]["nodes"][0]["peer"] == "node2"
    assert big["cluster"]["nodes"][0]["state"] == "held"
    assert big["cluster"]["nodes"][0]["worker_state"] == "ready"
    [hold] = pair.holds()
    assert hold["worker"] == "big-worker" and hold["holder"].endswith("/big")
    assert hold["state"] == "held" and hold["ttl"] == HOLD_TTL
    assert hold["worker_state"] == "ready"
    status2 = pair.node2.get("/status", headers=ADMIN2)[1]
    assert status2["models"]["big-worker"]["cluster"]["hold"]["id"] == hold["id"]
    assert status2["cluster_holds"][0]["holder"] == hold["holder"]
    running = pair.node2.get("/running", headers=ADMIN2)[1]["running"]
    assert running[0]["cluster"]["hold"]["holder"] == hold["holder"]
    metrics = pair.node1.get("/metrics")[1]
    assert metric_value(metrics, "swapd_cluster_holds", peer="node2", model="big") == 1
    # a worker is never listed, never served, never loaded by hand
    listed = pair.node2.get("/v1/models", headers={"Authorization": "Bearer node2-api-key"})[1]
    assert "big-worker" not in [m["id"] for m in listed["data"]]
    code, body = pair.node2.post("/v1/chat/completions", {"model": "big-worker"},
                                 headers={"Authorization": "Bearer node2-api-key"})
    assert code == 404 and "cluster worker" in body["error"]["message"]
    # held means held: node 2's own request waits, then 503 naming the holder; the hold is
    # renewed meanwhile (queueTimeout 5 s > holdTtl 3 s) and the head keeps serving
    t0 = time.monotonic()
    code, body = pair.node2.post("/v1/chat/completions", {
        "model": "local", "messages": []}, headers={"Authorization": "Bearer node2-api-key"})
    assert code == 503 and body["error"]["code"] == "cluster_held", body
    assert hold["holder"] in body["error"]["message"]
    assert time.monotonic() - t0 >= 4.5
    assert pid_alive(worker) and chat(pair.node1, "big")[0] == 200
    # stopping as one: a swap on node 1 stops the head, then the worker on node 2
    assert chat(pair.node1, "small")[0] == 200
    assert gone(head)
    wait_until(lambda: gone(worker), timeout=10, message="worker stopped")
    assert pair.holds() == []
    assert metric_value(pair.node1.get("/metrics")[1], "swapd_cluster_holds",
                        peer="node2", model="big") == 0
    # node 2's own model runs again
    assert chat(pair.node2, "local")[0] == 401  # (its API key is required)
    code, _ = pair.node2.post("/v1/chat/completions", {"model": "local", "messages": []},
                              headers={"Authorization": "Bearer node2-api-key"})
    assert code == 200


def test_a_worker_that_dies_stops_the_head_and_the_model_backs_off(pair: Pair) -> None:
    assert chat(pair.node1, "big")[0] == 200
    worker, head = pair.worker_pid(), pair.head_pid()
    in_flight: list[tuple[int, Any]] = []
    slow = threading.Thread(target=lambda: in_flight.append(pair.node1.post(
        "/v1/chat/completions", {"model": "big", "messages": [], "delay": 60})))
    slow.start()
    wait_until(lambda: pair.node1.status()["models"]["big"]["inflight"] == 1)
    os.kill(worker, signal.SIGUSR1)  # the worker dies on node 2
    # node 1's renewal (every holdTtl/3) finds the hold gone: the head is stopped
    wait_until(lambda: gone(head), timeout=HOLD_TTL + 5, message="head stopped")
    slow.join(30)
    [(code, body)] = in_flight  # the request in flight: 502 in the OpenAI shape
    assert code == 502 and "big-worker" in body["error"]["message"], body
    big = wait_until(lambda: (m := pair.node1.status()["models"]["big"])["failure"] and m)
    assert "big-worker" in big["failure"]["reason"] and "exited" in big["failure"]["reason"]
    code, body = chat(pair.node1, "big")
    assert code == 503 and body["error"]["code"] == "engine_start_failed"
    assert "big-worker" in body["error"]["message"]
    metrics = pair.node1.get("/metrics")[1]
    assert metric_value(metrics, "swapd_cluster_hold_failures_total", peer="node2",
                        reason="lost") == 1
    assert pair.holds() == []


def test_an_admin_unload_on_node2_ends_the_hold_and_stops_the_head(pair: Pair) -> None:
    assert chat(pair.node1, "big")[0] == 200
    worker, head = pair.worker_pid(), pair.head_pid()
    code, body = pair.node2.post("/models/big-worker/unload", headers=ADMIN2)
    assert code == 200 and body["unloaded"] == ["big-worker"]
    assert gone(worker)
    wait_until(lambda: gone(head), timeout=HOLD_TTL + 5, message="head stopped")
    big = wait_until(lambda: (m := pair.node1.status()["models"]["big"])["failure"] and m)
    assert "stopped by an admin" in big["failure"]["reason"]


def test_an_admin_unload_on_node1_stops_the_head_then_releases(pair: Pair) -> None:
    assert chat(pair.node1, "big")[0] == 200
    worker, head = pair.worker_pid(), pair.head_pid()
    code, _ = pair.node1.post("/models/big/unload")
    assert code == 200 and gone(head)
    wait_until(lambda: gone(worker), timeout=10, message="worker released")
    assert pair.holds() == []
    assert pair.node1.status()["models"]["big"]["failure"] is None


def test_a_crash_or_a_reload_of_the_head_releases_the_worker(pair: Pair) -> None:
    assert chat(pair.node1, "big")[0] == 200
    worker, head = pair.worker_pid(), pair.head_pid()
    os.kill(head, signal.SIGKILL)  # the head crashes
    wait_until(lambda: gone(worker), timeout=10, message="worker released after a crash")
    assert pair.holds() == []
    big = wait_until(lambda: (m := pair.node1.status()["models"]["big"])["failure"] and m)
    assert "crashed" in big["failure"]["reason"]
    # after its backoff, a new start takes a new hold; a reload that changes the recipe
    # stops the head, then releases the worker
    code, body = pair.node1.post("/models/big/load")  # an admin load clears the backoff
    assert code == 200, body
    worker = pair.worker_pid()
    assert pid_alive(worker) and len(pair.holds()) == 1
    text = pair.node1.config_path.read_text().replace("--workers 1", "--workers 01")
    pair.node1.config_path.write_text(text)
    pair.node1.signal(signal.SIGHUP)
    wait_until(lambda: gone(worker), timeout=15, message="worker released after a reload")
    assert pair.holds() == []


def test_a_head_that_dies_frees_node2_within_hold_ttl(pair: Pair) -> None:
    assert chat(pair.node1, "big")[0] == 200
    worker, head = pair.worker_pid(), pair.head_pid()
    pair.node1.proc.kill()  # swapd on node 1 SIGKILLed: nobody renews
    pair.node1.proc.wait()
    t0 = time.monotonic()
    wait_until(lambda: gone(worker), timeout=HOLD_TTL + 5, message="worker stopped")
    assert time.monotonic() - t0 <= HOLD_TTL + 3
    assert pair.holds() == []
    assert "not renewed" in pair.node2.log()
    os.kill(head, signal.SIGKILL)  # what the next swapd on node 1 would reap


def test_node2_shutdown_ends_the_hold_and_node1_stops_the_head(pair: Pair) -> None:
    assert chat(pair.node1, "big")[0] == 200
    worker, head = pair.worker_pid(), pair.head_pid()
    assert pair.node2.stop() == 0
    assert gone(worker)
    # unreachable peer: node 1 gives up once holdTtl passes without an answered renewal
    wait_until(lambda: gone(head), timeout=HOLD_TTL * 2 + 5, message="head stopped")
    metrics = pair.node1.get("/metrics")[1]
    assert metric_value(metrics, "swapd_cluster_hold_failures_total", peer="node2",
                        reason="unreachable") == 1


def test_a_hold_that_cannot_be_had_fails_the_start(start_swapd: Callable[..., Swapd],
                                                   tmp_path: Path) -> None:
    """Peer down: 503 with the reason, backoff, the head never started."""
    rec1 = tmp_path / "head.jsonl"
    node1 = start_swapd(node1_config(free_port(), free_port(), rec1))
    code, body = chat(node1, "big")
    assert code == 503 and body["error"]["code"] == "engine_start_failed"
    message = body["error"]["message"]
    assert "node2" in message and "unreachable" in message, message
    code, body = chat(node1, "big")  # in backoff: at once, no new try
    assert code == 503 and "backoff" in body["error"]["message"]
    assert read_records(rec1) == []
    metrics = node1.get("/metrics")[1]
    assert metric_value(metrics, "swapd_cluster_hold_failures_total", peer="node2",
                        reason="unreachable") == 1


def test_a_worker_that_fails_to_start_fails_the_head_and_releases_the_others(
        start_swapd: Callable[..., Swapd], tmp_path: Path) -> None:
    """Two peers: one worker starts, the other exits at once; the start fails with the
    failing worker's reason and the hold already taken is released."""
    gcs = free_port()
    rec1, rec2 = tmp_path / "head.jsonl", tmp_path / "worker.jsonl"
    good = start_swapd(node2_config(gcs, rec2), name="good.yaml", state_dir=tmp_path / "s2")
    bad_cfg = node2_config(gcs, tmp_path / "bad.jsonl")
    bad_cfg["models"]["big-worker"] = model(fake_cmd("--crash-after", "0"),
                                            clusterWorker=True)
    bad = start_swapd(bad_cfg, name="bad.yaml", state_dir=tmp_path / "s3")
    cfg = node1_config(good.port, gcs, rec1)
    cfg["peers"]["node3"] = {"proxy": f"http://127.0.0.1:{bad.port}", "apiKey": KEY2}
    cfg["models"]["big"]["cluster"]["nodes"]["node3"] = "big-worker"
    node1 = start_swapd(cfg, name="node1.yaml", state_dir=tmp_path / "s1")
    code, body = chat(node1, "big")
    assert code == 503, body
    message = body["error"]["message"]
    assert "node3" in message and "simulated crash" in message, message
    workers = [r["pid"] for r in read_records(rec2) if r["event"] == "start"]
    for pid in workers:
        wait_until(lambda pid=pid: gone(pid), timeout=10, message="taken hold released")
    assert http("GET", good.url + "/api/cluster/holds", headers=ADMIN2)[1]["holds"] == []
    assert read_records(rec1) == []  # the head never started
    metrics = node1.get("/metrics")[1]
    assert metric_value(metrics, "swapd_cluster_hold_failures_total", peer="node3",
                        reason="worker_failed") == 1


def test_the_hold_route_refuses_what_an_attacker_sends(start_swapd: Callable[..., Swapd],
                                                       tmp_path: Path) -> None:
    node2 = start_swapd(node2_config(free_port(), tmp_path / "w.jsonl"))
    url = node2.url + "/api/cluster/holds"
    good = {"worker": "big-worker", "holder": "node1/big", "ttl": 5}

    def post(body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        return http("POST", url, body, headers=headers)

    assert post(good)[0] == 401  # no key (adminKeys set)
    assert post(good, {"Authorization": "Bearer node2-api-key"})[0] == 401  # an API key
    code, body = post(good, {**ADMIN2, "Origin": "http://evil.example"})
    assert code == 403 and body["error"]["code"] == "cross_origin_forbidden"
    code, body = post({**good, "worker": "local"}, ADMIN2)
    assert code == 409 and body["error"]["code"] == "not_a_cluster_worker"
    assert post({**good, "worker": "nope"}, ADMIN2)[0] == 404
    assert post({**good, "worker": "../../bin/sh"}, ADMIN2)[0] == 400
    assert post({**good, "ttl": 10**9}, ADMIN2)[0] == 400
    assert post({**good, "ttl": True}, ADMIN2)[0] == 400
    assert post({**good, "holder": "x\x1b[31m"}, ADMIN2)[0] == 400
    assert post({**good, "holder": "h" * 10_000}, ADMIN2)[0] in (400, 413)
    assert post({**good, "cmd": "rm -rf /"}, ADMIN2)[0] == 200  # a command is never read
    assert post(b"[" * 100_000, ADMIN2)[0] == 413
    assert http("PUT", url + "/forged", {"ttl": 5}, headers=ADMIN2)[0] == 404
    assert http("DELETE", url + "/" + "x" * 500, headers=ADMIN2)[0] == 404
    # the holder's re-POST renews the same hold; one head at a time
    [first] = http("GET", url, headers=ADMIN2)[1]["holds"]
    code, body = post(good, ADMIN2)
    assert code == 200 and body["hold"]["id"] == first["id"]
    code, body = post({**good, "holder": "intruder"}, ADMIN2)
    assert code == 409 and "node1/big" in body["error"]["message"]
    assert "rm -rf" not in node2.log()
