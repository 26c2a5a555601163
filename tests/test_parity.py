"""Drop-in parity with llama-swap's routing keys, end to end: a real swapd process, fake
engines, and peers that are a second swapd or a fake engine on loopback."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
from pathlib import Path
from typing import Any

from tests.support import Swapd, fake_cmd, free_port, http, model, wait_until


def state(daemon: Swapd, name: str) -> str:
    return str(daemon.status()["models"][name]["state"])


def echo(daemon: Swapd, name: str, path: str = "/v1/rerank", **extra: Any) -> tuple[int, Any]:
    """POST an inference route the fake engine echoes: what reached the engine."""
    code, body = daemon.post(path, {"model": name, **extra}, headers=extra.pop("headers", None))
    if code == 200 and isinstance(body, dict) and "body" in body:
        body = {**body, "sent": json.loads(body["body"])}
    return code, body


def listing(daemon: Swapd, headers: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    code, doc = daemon.get("/v1/models", headers=headers)
    assert code == 200, doc
    return {entry["id"]: entry for entry in doc["data"]}


# -- setParamsByID, capabilities, metadata, alias rows, unlisted --------------------------


def test_set_params_by_id_capabilities_and_listing(start_swapd):
    daemon = start_swapd({
        "includeAliasesInList": True,
        "models": {
            "alpha": model(
                fake_cmd("--chatty", "1", name="alpha"), name="Alpha", description="the first",
                aliases=["a1"], metadata={"family": "fake"},
                filters={
                    "setParams": {"temperature": 0.5, "top_p": 0.9},
                    "setParamsByID": {
                        "${MODEL_ID}": {"effort": "medium"},
                        "${MODEL_ID}:high": {"effort": "high", "temperature": 0.1,
                                             "model": "hijack"},
                    },
                },
                capabilities={"in": ["text", "image"], "out": ["text"], "tools": True,
                              "context": 8192},
            ),
            "hidden": model(fake_cmd(name="hidden"), unlisted=True),
        },
    })
    code, body = echo(daemon, "alpha:high", temperature=1.0)
    assert code == 200, body
    # after setParams, so it wins; `model` is protected and names the model
    assert body["sent"] == {"model": "alpha", "temperature": 0.1, "top_p": 0.9,
                            "effort": "high"}
    assert echo(daemon, "alpha")[1]["sent"]["effort"] == "medium"
    assert "effort" not in echo(daemon, "a1")[1]["sent"]  # an explicit alias: no entry

    models = listing(daemon)
    alpha = models["alpha"]
    assert alpha["name"] == "Alpha" and alpha["metadata"] == {"family": "fake"}
    assert alpha["capabilities"] == {"vision": True, "function_calling": True}
    assert alpha["architecture"]["modality"] == "text+image->text"
    assert alpha["context_length"] == 8192 and alpha["meta"]["n_ctx"] == 8192
    assert alpha["supported_parameters"] == ["tools", "tool_choice"]
    assert alpha["meta"]["llamaswap"]["type"] == "model"
    # alias rows: setParamsByID ids are aliases too; each row has a name of its own
    assert models["a1"]["name"] == "Alpha (alias a1)"
    assert models["alpha:high"]["name"] == "Alpha (alias alpha:high)"
    assert models["a1"]["meta"]["llamaswap"] == {"family": "fake", "type": "alias",
                                                 "modelID": "alpha"}
    assert "hidden" not in models  # unlisted, yet served
    assert echo(daemon, "hidden")[0] == 200
    # without logToStdout, engine output is on swapd's stdout too (as always)
    wait_until(lambda: "chatty /v1/rerank 1/1" in daemon.log(), message="engine line")


# -- selectors and profiles ----------------------------------------------------------------


def selector_config(rec: Path | None = None) -> dict[str, Any]:
    return {
        "models": {
            "alpha": model(fake_cmd(name="alpha")),
            "beta": model(fake_cmd(name="beta")),
        },
        "selectors": {
            "fast": {"strategy": "warm", "targets": ["beta", "alpha"], "name": "Fast",
                     "description": "whichever is loaded", "metadata": {"tier": 1}},
            "planner": {"strategy": "pin", "targets": ["alpha", "beta"]},
        },
        "profiles": {
            "coding": {"description": "code", "pins": {"llm-code": "planner", "beta": None}},
        },
    }


def test_selectors_warm_and_pin(start_swapd):
    daemon = start_swapd(selector_config())
    models = listing(daemon)
    assert models["fast"]["name"] == "Fast" and models["fast"]["metadata"] == {"tier": 1}
    assert models["fast"]["description"] == "whichever is loaded"
    assert models["fast"]["meta"]["llamaswap"]["strategy"] == "warm"
    assert models["planner"]["meta"]["llamaswap"]["targets"] == ["alpha", "beta"]

    # warm: nothing runs, so the first target is cold-started
    code, body = echo(daemon, "fast")
    assert code == 200 and body["x_served_by"] == "beta"
    assert body["sent"]["model"] == "beta"
    # pin: always the first target (this swaps beta out: one tenant)
    assert echo(daemon, "planner")[1]["x_served_by"] == "alpha"
    # warm now picks the loaded one instead of swapping back
    assert echo(daemon, "fast")[1]["x_served_by"] == "alpha"
    assert state(daemon, "beta") == "stopped"

    # selectors are refused on /upstream; their targets are not
    code, body = daemon.post("/upstream/fast/v1/echo", {})
    assert code == 400 and body["error"]["code"] == "selector_not_allowed"
    assert daemon.post("/upstream/alpha/v1/echo", {})[0] == 200


def test_profiles_switch_pins_at_runtime(start_swapd):
    daemon = start_swapd(selector_config())
    assert echo(daemon, "llm-code")[0] == 404  # no profile at startup
    code, doc = daemon.get("/api/profiles")
    assert code == 200 and doc["active"] is None
    assert doc["profiles"] == [{"id": "coding", "description": "code",
                                "pins": {"llm-code": "planner", "beta": ""}}]

    code, doc = http("PUT", daemon.url + "/api/profiles/active", {"name": "coding"})
    assert code == 200 and doc == {"active": "coding"}
    assert daemon.status()["profile"] == {"active": "coding", "available": ["coding"]}
    # the pin leads to a selector, the selector to alpha
    code, body = echo(daemon, "llm-code")
    assert code == 200 and body["x_served_by"] == "alpha" and body["sent"]["model"] == "alpha"
    # a ~ pin turns a name off, on every route
    code, body = echo(daemon, "beta")
    assert code == 404 and "profile 'coding'" in body["error"]["message"]
    assert daemon.post("/upstream/beta/v1/echo", {})[0] == 404
    models = listing(daemon)
    assert models["llm-code"]["meta"]["llamaswap"] == {"type": "profile", "target": "planner"}
    assert "beta" in models  # still listed: only new names are added

    code, doc = http("PUT", daemon.url + "/api/profiles/active", {"name": "nope"})
    assert code == 404 and doc["error"]["code"] == "profile_not_found"
    assert daemon.status()["profile"]["active"] == "coding"
    code, doc = http("PUT", daemon.url + "/api/profiles/active", {"nam": 1})
    assert code == 400

    # a reload selects none again (llama-swap's rule)
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: daemon.status()["profile"]["active"] is None, message="profile reset")
    assert echo(daemon, "beta")[1]["x_served_by"] == "beta"
    http("PUT", daemon.url + "/api/profiles/active", {"name": "coding"})
    assert http("PUT", daemon.url + "/api/profiles/active", {"name": None})[1] == {
        "active": None}
    assert echo(daemon, "llm-code")[0] == 404


def test_profile_route_is_an_admin_route(start_swapd):
    daemon = start_swapd({**selector_config(), "adminKeys": ["adm"], "apiKeys": ["usr"]})
    auth = {"Authorization": "Bearer usr"}
    code, _ = http("PUT", daemon.url + "/api/profiles/active", {"name": "coding"},
                   headers=auth)
    assert code == 401
    code, _ = http("PUT", daemon.url + "/api/profiles/active", {"name": "coding"},
                   headers={"Authorization": "Bearer adm"})
    assert code == 200


def test_spillover_starts_the_next_target_when_the_first_is_full(start_swapd):
    daemon = start_swapd({
        "models": {
            "s1": model(fake_cmd("--token-delay", "0.2", "--stream-tokens", "8", name="s1")),
            "s2": model(fake_cmd("--token-delay", "0.2", "--stream-tokens", "8", name="s2")),
        },
        "groups": {"pool": {"swap": False, "exclusive": False, "members": ["s1", "s2"]}},
        "selectors": {"spill": {"strategy": "spillover", "targets": ["s1", "s2"],
                                "settings": {"spillover": 1}}},
    })
    assert listing(daemon)["spill"]["meta"]["llamaswap"]["spillover"] == 1

    def stream() -> str:
        code, body = daemon.post("/v1/chat/completions",
                                 {"model": "spill", "stream": True,
                                  "messages": [{"role": "user", "content": "x"}]})
        assert code == 200
        first = next(line for line in body.splitlines() if line.startswith("data: {"))
        return str(json.loads(first[6:])["model"])

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(stream)
        wait_until(lambda: daemon.status()["models"]["s1"]["inflight"] == 1
                   or daemon.status()["models"]["s1"]["queued"] == 1, message="s1 busy")
        second = pool.submit(stream)
        assert {first.result(30), second.result(30)} == {"s1", "s2"}
    assert state(daemon, "s1") == state(daemon, "s2") == "ready"


# -- peers ---------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_peers_another_swapd_and_a_stub(start_swapd, tmp_path):
    # The peer: a second swapd with its own key and engine.
    peer = start_swapd({"apiKeys": ["sk-peer"],
                        "models": {"far": model(fake_cmd(name="far"))}},
                       state_dir=tmp_path / "peer-state")
    # A stub peer: a fake engine on its own, showing what arrives.
    stub_port = free_port()
    import subprocess
    import sys

    from tests.support import FAKE_ENGINE
    stub = subprocess.Popen([sys.executable, str(FAKE_ENGINE), "--port", str(stub_port),
                             "--model-name", "stub"])
    slow_port = free_port()
    slow = subprocess.Popen([sys.executable, str(FAKE_ENGINE), "--port", str(slow_port),
                             "--model-name", "slow", "--lazy-load", "5"])
    try:
        def up(port: int) -> bool:
            try:
                return http("GET", f"http://127.0.0.1:{port}/health", timeout=1)[0] == 200
            except OSError:
                return False

        wait_until(lambda: up(stub_port) and up(slow_port), message="stubs up")
        daemon = start_swapd({
            "apiKeys": ["sk-local"],
            "models": {"near": model(fake_cmd(name="near"), aliases=["shadow"])},
            "peers": {
                "lab": {"proxy": peer.url, "apiKey": "sk-peer", "models": ["far"],
                        "filters": {"setParams": {"seed": 7}, "stripParams": "top_k"}},
                "stub": {"proxy": f"http://127.0.0.1:{stub_port}/", "apiKey": "sk-stub",
                         "models": ["echo-m", "shadow", "org/deep"]},
                "nokey": {"proxy": f"http://127.0.0.1:{stub_port}", "models": ["bare"]},
                "slow": {"proxy": f"http://127.0.0.1:{slow_port}", "models": ["late"],
                         "timeouts": {"responseHeader": 1}},
                "down": {"proxy": f"http://127.0.0.1:{closed_port()}", "models": ["gone"]},
            },
        })
        auth = {"Authorization": "Bearer sk-local"}

        def post(name: str, path: str = "/v1/chat/completions", **extra: Any) -> Any:
            return daemon.post(path, {"model": name, "messages": [{"role": "user",
                                                                    "content": "hi"}],
                                      **extra}, headers=auth)

        # <peer>/<model> and the unqualified name both reach the second swapd
        code, body = post("lab/far")
        assert code == 200, body
        assert body["choices"][0]["message"]["content"] == "hello from far"
        assert post("far")[0] == 200
        assert peer.status()["models"]["far"]["state"] == "ready"
        # ... and never a local engine
        assert state(daemon, "near") == "stopped"

        # what a peer receives: its key in both headers, not the client's; its filters
        code, body = post("stub/echo-m", "/v1/rerank", top_k=3)
        assert code == 200, body
        assert body["headers"]["authorization"] == "Bearer sk-stub"
        assert body["headers"]["x-api-key"] == "sk-stub"
        assert json.loads(body["body"])["model"] == "echo-m"
        code, body = post("bare", "/v1/rerank")
        assert code == 200 and "authorization" not in body["headers"]
        assert "x-api-key" not in body["headers"]
        assert post("stub/org/deep", "/v1/rerank")[1]["x_served_by"] == "stub"
        # a local alias wins over an unqualified peer model of the same name
        assert post("shadow", "/v1/rerank")[1]["x_served_by"] == "near"
        assert post("stub/shadow", "/v1/rerank")[1]["x_served_by"] == "stub"

        # failures are OpenAI-shaped: 502 refused, 504 past responseHeader
        code, body = post("down/gone")
        assert code == 502 and body["error"]["code"] == "engine_error"
        assert "peer 'down'" in body["error"]["message"]
        code, body = post("late")
        assert code == 504 and body["error"]["code"] == "upstream_timeout"
        assert "responseHeader" in body["error"]["message"]

        models = listing(daemon, auth)
        assert models["lab/far"]["meta"]["llamaswap"] == {"type": "peer", "peerID": "lab"}
        assert models["lab/far"]["name"] == "lab: far"
        assert {"stub/echo-m", "down/gone", "slow/late"} <= set(models)
        # /upstream reaches peers too, by their qualified name, on inference paths only
        # (issue 21: a peer's other routes are not the client's to reach with its key)
        code, body = daemon.post("/upstream/stub/echo-m/v1/rerank", {"x": 1}, headers=auth)
        assert code == 200 and body["path"] == "/v1/rerank"
        assert json.loads(body["body"]) == {"x": 1, "model": "echo-m"}
        code, body = daemon.post("/upstream/stub/echo-m/anything", {"x": 1}, headers=auth)
        assert code == 403 and body["error"]["code"] == "peer_path_forbidden", body
        assert "sk-peer" not in daemon.log() and "sk-stub" not in daemon.log()
    finally:
        for proc in (stub, slow):
            proc.terminate()
            proc.wait(10)


# -- upstream.ignorePaths, timeouts, logToStdout ------------------------------------------


def test_ignore_paths_never_start_a_model(start_swapd):
    daemon = start_swapd({
        "logToStdout": "proxy",
        "models": {
            "alpha": model(fake_cmd("--chatty", "1", name="alpha")),
            "slowpoke": model(fake_cmd("--lazy-load", "5", name="slowpoke"),
                              timeouts={"responseHeader": 1}),
        },
        "upstream": {"ignorePaths": [r"\.json$", r"^/ws$"]},
    })
    code, body = daemon.get("/upstream/alpha/static/app.json")
    assert code == 409 and body["error"]["code"] == "model_not_loaded"
    assert body["error"]["type"] == "invalid_request_error"
    assert daemon.get("/upstream/alpha/ws")[0] == 409
    assert state(daemon, "alpha") == "stopped"
    assert daemon.post("/upstream/alpha/v1/start", {})[0] == 200  # not ignored: starts it
    code, body = daemon.get("/upstream/alpha/static/app.json")
    assert code == 200 and body["path"] == "/static/app.json"  # running: relayed

    # a model's responseHeader timeout: OpenAI-shaped 504, the engine untouched
    code, body = daemon.post("/v1/chat/completions", {"model": "slowpoke", "messages": []})
    assert code == 504 and body["error"]["code"] == "upstream_timeout"

    # logToStdout: proxy keeps engine output off stdout, while /logs still has it
    echo(daemon, "alpha")
    line = "chatty /v1/rerank 1/1"
    wait_until(lambda: line in daemon.get("/logs")[1], message="engine output in /logs")
    assert line not in daemon.log()
