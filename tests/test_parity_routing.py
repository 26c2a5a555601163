"""llama-swap's matrix router and fifo priority, end to end with fake engines: which engines
run together, which are stopped, and who is served first. The engines' own records say
what ran when, never swapd's word for it."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

from tests.support import Swapd, fake_cmd, model, read_records, wait_until


def chat(daemon: Swapd, name: str) -> tuple[int, Any]:
    return daemon.post("/v1/chat/completions",
                       {"model": name, "messages": [{"role": "user", "content": "hi"}]})


def running(daemon: Swapd) -> set[str]:
    return {m for m, s in daemon.status()["models"].items() if s["state"] != "stopped"}


def lifetimes(rec: Path) -> dict[str, list[tuple[float, float]]]:
    """model → [(start, exit)] from the engines' own records (exit inf while alive)."""
    out: dict[str, list[tuple[float, float]]] = {}
    started: dict[int, tuple[str, float]] = {}
    for event in read_records(rec):
        if event["event"] == "start":
            started[event["pid"]] = (event["model"], event["t"])
        elif event["event"] == "exit" and event["pid"] in started:
            name, t0 = started.pop(event["pid"])
            out.setdefault(name, []).append((t0, event["t"]))
    for name, t0 in started.values():
        out.setdefault(name, []).append((t0, float("inf")))
    return out


def overlapped(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> bool:
    return any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)


def test_matrix_router_keeps_allowed_sets_and_evicts_the_cheapest(start_swapd, tmp_path):
    rec = tmp_path / "records.jsonl"
    names = ["t", "b", "c", "x", "loner"]
    daemon = start_swapd({
        "models": {n: model(fake_cmd(record=rec, name=n)) for n in names},
        "routing": {"router": {"use": "matrix", "settings": {"matrix": {
            "vars": {"big": "b"},
            "evict_costs": {"big": 10},
            "sets": {"tb": "t & big", "tc": "t & c", "bc": "big & c", "alone": "x"},
        }}}},
    })
    # subset semantics: b and c may run together; neither start evicts the other
    assert chat(daemon, "b")[0] == 200 and chat(daemon, "c")[0] == 200
    assert running(daemon) == {"b", "c"}
    # t runs with b (set tb) or with c (tc): keeping b (cost 10) beats keeping c (cost 1)
    assert chat(daemon, "t")[0] == 200
    assert running(daemon) == {"t", "b"}
    # x runs alone: everything goes
    assert chat(daemon, "x")[0] == 200
    assert running(daemon) == {"x"}
    # only the target starts: b is allowed beside t but not preloaded
    assert chat(daemon, "t")[0] == 200
    assert running(daemon) == {"t"}
    # a model in no set runs alone too
    assert chat(daemon, "b")[0] == 200 and running(daemon) == {"t", "b"}
    assert chat(daemon, "loner")[0] == 200 and running(daemon) == {"loner"}

    life = lifetimes(rec)
    assert overlapped(life["b"], life["c"])  # they really ran together
    assert overlapped(life["t"], life["b"])
    for other in ("t", "b", "c"):  # x and loner never shared the machine
        assert not overlapped(life["x"], life[other])
        assert not overlapped(life["loner"], life[other])
    assert not overlapped(life["t"], life["c"])


def test_priority_serves_the_higher_first_and_still_answers_the_lower(start_swapd, tmp_path):
    rec = tmp_path / "records.jsonl"
    daemon = start_swapd({
        "models": {n: model(fake_cmd(record=rec, name=n)) for n in ("tenant", "low", "high")},
        "routing": {"scheduler": {"use": "fifo",
                                  "settings": {"fifo": {"priority": {"high": 10}}}}},
    })
    assert chat(daemon, "tenant")[0] == 200
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        # the tenant is busy: whoever comes next must wait for it
        busy = pool.submit(daemon.post, "/upstream/tenant/slow?seconds=2")
        wait_until(lambda: daemon.status()["models"]["tenant"]["inflight"] == 1,
                   message="tenant busy")
        low = pool.submit(chat, daemon, "low")
        wait_until(lambda: daemon.status()["models"]["low"]["queued"] == 1,
                   message="low queued")
        high = pool.submit(chat, daemon, "high")  # arrives later, has priority 10
        wait_until(lambda: daemon.status()["models"]["high"]["queued"] == 1,
                   message="high queued")
        assert busy.result(30)[0] == 200
        assert high.result(60)[0] == 200
        assert low.result(60)[0] == 200  # not lost: answered after the higher one
    starts = [e["model"] for e in read_records(rec) if e["event"] == "start"]
    assert starts == ["tenant", "high", "low"]
