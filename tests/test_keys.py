"""Named keys against a real swapd and the fake engine (issue 23, docs/keys.md): scopes (404
and the listing), each limit (429 with an honest Retry-After), a quota across a restart,
`swap: false` (409, the tenant untouched), expiry, roles on every operations and recipe
route, and usage sums equal to what the engine reported."""

from __future__ import annotations

import http.client as client
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import Swapd, fake_cmd, http, metric_value, model, port_block, wait_until

KEYS = {
    "alice": {"key": "alice-k", "role": "operator"},
    "boss": {"key": "boss-k", "role": "admin"},
    "agent": {"key": "agent-k", "models": ["small*"], "swap": False},
    "scoped": {"key": "scoped-k", "models": ["small", "slo?"]},
    "busy": {"key": "busy-k", "maxConcurrent": 1},
    "rpm": {"key": "rpm-k", "requestsPerMinute": 2},
    "tuner": {"key": "tuner-k", "tokensPerDay": 10},
    "old": {"key": "old-k", "expires": "2020-01-01"},
}


def config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    (tmp_path / "recipes").mkdir(exist_ok=True)
    return {
        "startPort": port_block(),
        "include": "recipes/*.yaml",
        "keys": KEYS,
        "apiKeys": ["api-k"],
        "activity": {"store": "sqlite"},
        "models": {
            "big": model(fake_cmd(name="big")),
            "small": model(fake_cmd(name="small"), aliases=["small-alias"]),
            "slow": model(fake_cmd("--token-delay", "0.3", "--stream-tokens", "6", name="slow"),
                          gpu=False),
        },
        **extra,
    }


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def chat(daemon: Swapd, name: str, key: str | None) -> tuple[int, Any]:
    return daemon.post("/v1/chat/completions", {"model": name, "messages": []},
                       headers=auth(key))


def with_headers(daemon: Swapd, method: str, path: str, key: str | None,
                 body: Any = None, ctype: str = "application/json",
                 ) -> tuple[int, dict[str, str], Any]:
    """Status, headers and body; for a live stream, only its status and headers."""
    conn = client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    try:
        headers = {**auth(key)}
        data = None
        if body is not None:
            data = body if isinstance(body, str) else json.dumps(body)
            headers["Content-Type"] = ctype
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        got = {k.lower(): v for k, v in resp.getheaders()}
        if resp.status == 200 and ("/stream" in path or "/sse" in path or "/events" in path
                                   or got.get("content-type", "").startswith("text/event")):
            return resp.status, got, None  # an endless stream: its status is the answer
        raw = resp.read()
        try:
            return resp.status, got, json.loads(raw)
        except ValueError:
            return resp.status, got, raw.decode(errors="replace")
    finally:
        conn.close()


def pid_of(daemon: Swapd, name: str) -> int | None:
    code, doc = daemon.get("/status", headers=auth("alice-k"))
    assert code == 200, doc
    return doc["models"][name]["pid"]  # type: ignore[no-any-return]


@pytest.fixture
def daemon(start_swapd, tmp_path) -> Swapd:
    return start_swapd(config(tmp_path))


def test_a_model_out_of_scope_is_404_as_if_it_did_not_exist_and_is_not_listed(daemon):
    code, body = chat(daemon, "big", "scoped-k")
    unknown_code, unknown = chat(daemon, "no-such-model", "scoped-k")
    assert (code, unknown_code) == (404, 404)
    assert body["error"]["message"] == "model 'big' is not configured"
    assert body["error"]["code"] == unknown["error"]["code"] == "model_not_found"
    # Through /upstream too.
    assert daemon.get("/upstream/big/health", headers=auth("scoped-k"))[0] == 404
    code, listing = daemon.get("/v1/models", headers=auth("scoped-k"))
    assert code == 200
    assert sorted(m["id"] for m in listing["data"]) == ["slow", "small"]
    code, router = daemon.get("/models", headers=auth("scoped-k"))  # llama.cpp's router API
    assert code == 200 and sorted(m["id"] for m in router["data"]) == ["slow", "small"]
    # An alias is in scope with its model; a key without `models` sees everything.
    assert chat(daemon, "small-alias", "scoped-k")[0] == 200
    code, listing = daemon.get("/v1/models", headers=auth("alice-k"))
    assert sorted(m["id"] for m in listing["data"]) == ["big", "slow", "small"]


def test_a_key_that_may_not_swap_gets_409_and_the_tenant_stays(daemon):
    assert chat(daemon, "big", "alice-k")[0] == 200
    big = pid_of(daemon, "big")
    code, body = chat(daemon, "small", "agent-k")
    assert code == 409, body
    assert body["error"]["code"] == "model_not_loaded"
    assert "'agent' may not start it (swap: false)" in body["error"]["message"]
    assert pid_of(daemon, "big") == big and pid_of(daemon, "small") is None
    # Once someone else runs it, the agent uses it.
    assert chat(daemon, "small", "alice-k")[0] == 200
    code, body = chat(daemon, "small", "agent-k")
    assert code == 200, body


def test_an_expired_key_is_401_saying_so(daemon):
    code, body = chat(daemon, "small", "old-k")
    assert code == 401
    assert body["error"]["code"] == "key_expired"
    assert body["error"]["message"] == "key 'old' expired on 2020-01-01 00:00 UTC"
    code, body = chat(daemon, "small", "nobody-k")
    assert (code, body["error"]["code"]) == (401, "invalid_api_key")


def test_requests_per_minute_429_with_the_time_until_the_window_frees(daemon):
    t0 = time.time()
    assert chat(daemon, "slow", "rpm-k")[0] == 200
    assert chat(daemon, "slow", "rpm-k")[0] == 200
    code, headers, body = with_headers(daemon, "POST", "/v1/chat/completions", "rpm-k",
                                       {"model": "slow", "messages": []})
    elapsed = time.time() - t0
    assert code == 429, body
    assert body["error"]["code"] == "key_limit" and "requestsPerMinute" in body["error"]["message"]
    # The first request leaves the minute 60 s after it came: that, rounded up.
    retry = int(headers["retry-after"])
    assert 60 - elapsed - 1 <= retry <= 60


def test_max_concurrent_429_while_a_request_is_in_flight(daemon):
    conn = client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    conn.request("POST", "/v1/chat/completions",
                 body=json.dumps({"model": "slow", "messages": [], "stream": True}),
                 headers={"Content-Type": "application/json", **auth("busy-k")})
    held = conn.getresponse()
    assert held.status == 200
    held.readline()  # the stream is under way: the key's one slot is taken
    code, headers, body = with_headers(daemon, "POST", "/v1/chat/completions", "busy-k",
                                       {"model": "slow", "messages": []})
    assert code == 429, body
    assert "maxConcurrent" in body["error"]["message"]
    # No history yet: the shortest honest wait, 1 s.
    assert headers["retry-after"] == "1"
    # Another key is not held back by this one.
    assert chat(daemon, "slow", "alice-k")[0] == 200
    held.read()
    conn.close()
    assert wait_until(lambda: chat(daemon, "slow", "busy-k")[0] == 200, timeout=10)


def test_the_quota_lets_the_crossing_request_finish_and_survives_a_restart(start_swapd, tmp_path):
    cfg = config(tmp_path)
    daemon = start_swapd(cfg)
    # The fake engine reports 3 prompt + 4 completion tokens: 7, then 14 crosses 10.
    assert chat(daemon, "slow", "tuner-k")[0] == 200
    assert chat(daemon, "slow", "tuner-k")[0] == 200
    code, headers, body = with_headers(daemon, "POST", "/v1/chat/completions", "tuner-k",
                                       {"model": "slow", "messages": []})
    assert code == 429, body
    assert "tokensPerDay" in body["error"]["message"]
    now = time.time()
    midnight = (now // 86400 + 1) * 86400
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(midnight))
    assert f"the count restarts at {reset}" in body["error"]["message"]
    assert abs(int(headers["retry-after"]) - (midnight - now)) <= 5
    assert headers["x-ratelimit-reset"] == str(int(midnight))
    assert daemon.stop() == 0
    again = start_swapd(cfg, port=daemon.port)
    code, body = chat(again, "slow", "tuner-k")
    assert code == 429, body
    code, usage = again.get("/api/usage?by=key", headers=auth("alice-k"))
    assert code == 200
    tuner = next(row for row in usage["data"] if row["name"] == "tuner")
    assert (tuner["requests"], tuner["tokens"]) == (2, 14)
    assert usage["store"] == "sqlite"


def test_usage_and_key_metrics_sum_what_the_engine_reported(daemon):
    for _ in range(3):
        assert chat(daemon, "slow", "alice-k")[0] == 200
    assert chat(daemon, "small", "alice-k")[0] == 200
    assert chat(daemon, "slow", "api-k")[0] == 200
    code, by_key = daemon.get("/api/usage?by=key", headers=auth("alice-k"))
    assert code == 200, by_key
    rows = {row["name"]: row for row in by_key["data"]}
    assert rows["alice"] == {"name": "alice", "requests": 4, "errors": 0, "prompt_tokens": 12,
                             "completion_tokens": 16, "tokens": 28}
    assert rows["apiKeys[0]"]["tokens"] == 7
    assert rows["boss"]["requests"] == 0  # configured, unused: listed at 0
    code, by_model = daemon.get("/api/usage?by=model&since=2020-01-01", headers=auth("boss-k"))
    models = {row["name"]: row for row in by_model["data"]}
    assert models["slow"]["prompt_tokens"] == 12 and models["small"]["completion_tokens"] == 4
    assert daemon.get("/api/usage?by=nothing", headers=auth("boss-k"))[0] == 400
    assert daemon.get("/api/usage?since=soon", headers=auth("boss-k"))[0] == 400
    # Not for an inference key.
    assert daemon.get("/api/usage", headers=auth("api-k"))[0] == 401
    assert daemon.get("/api/usage", headers=auth("agent-k"))[0] == 403
    # The records name the key, never the key itself.
    code, activity = daemon.get("/api/activity", headers=auth("alice-k"))
    assert {r["key"] for r in activity["data"]} == {"alice", "apiKeys[0]"}
    assert "alice-k" not in json.dumps(activity)
    _, text = daemon.get("/metrics")
    assert metric_value(text, "swapd_key_tokens_total", key="alice", kind="prompt") == 12
    assert metric_value(text, "swapd_key_tokens_total", key="alice", kind="completion") == 16
    assert metric_value(text, "swapd_key_requests_total", key="alice", model="slow",
                        code="200") == 3
    # Every configured key has its token series from the start.
    assert "swapd_key_tokens_total{key=\"boss\",kind=\"prompt\"} 0.0" in text
    assert "alice-k" not in text


# Every operations and recipe route, and what each role gets: an inference key is refused
# both, an operator key the recipes, an admin key nothing.
OPERATIONS = [
    ("GET", "/running"), ("GET", "/status"), ("GET", "/logs"), ("GET", "/logs/stream"),
    ("GET", "/logs/stream/small"), ("POST", "/unload"), ("GET", "/unload"),
    ("POST", "/models/small/unload"), ("GET", "/api/activity"), ("GET", "/api/gpu"),
    ("GET", "/api/usage"), ("GET", "/api/profiles"), ("GET", "/api/activity/stream"),
    ("POST", "/models/slow/load"), ("POST", "/models/small/sleep"),
    # llama-swap's and llama.cpp's router API's operations routes.
    ("POST", "/api/models/unload"), ("POST", "/api/models/unload/small"), ("GET", "/api/version"),
    ("GET", "/api/events"), ("GET", "/api/metrics/activity"), ("GET", "/api/metrics/stats"),
    ("POST", "/models/unload"), ("GET", "/models/sse"),
]
# Recipes, and cluster holds (a process started for another node's head): admin only.
RECIPES = [("GET", "/admin/recipes/extra"), ("PUT", "/admin/recipes/extra"),
           ("DELETE", "/admin/recipes/extra"), ("GET", "/api/cluster/holds")]


def test_roles_on_every_operations_and_recipe_route(daemon):
    recipe = json.dumps({"cmd": fake_cmd(name="extra"), "proxy": "http://127.0.0.1:${PORT}",
                         "gpu": False})

    def status(method: str, path: str, key: str | None) -> int:
        body = recipe if method == "PUT" else None
        return with_headers(daemon, method, path, key, body)[0]

    for method, path in OPERATIONS + RECIPES:
        assert status(method, path, None) == 401, (method, path)
        assert status(method, path, "api-k") == 401, (method, path)  # as before keys:
        assert status(method, path, "agent-k") == 403, (method, path)
    for method, path in OPERATIONS:
        assert status(method, path, "alice-k") not in (401, 403), (method, path)
        assert status(method, path, "boss-k") not in (401, 403), (method, path)
    for method, path in RECIPES:
        assert status(method, path, "alice-k") == 403, (method, path)
    assert status("PUT", "/admin/recipes/extra", "boss-k") == 201
    assert status("GET", "/admin/recipes/extra", "boss-k") == 200
    assert status("DELETE", "/admin/recipes/extra", "boss-k") == 200
    # The status page itself is open (it holds no data); what it reads is not.
    assert daemon.get("/ui")[0] == 200


def test_old_lists_alone_behave_as_before(start_swapd, tmp_path):
    daemon = start_swapd({"startPort": port_block(), "apiKeys": ["api-k"],
                          "adminKeys": ["admin-k"],
                          "models": {"m": model(fake_cmd(name="m"), gpu=False)}})
    assert chat(daemon, "m", None)[0] == 401
    assert chat(daemon, "m", "api-k")[0] == 200
    assert chat(daemon, "m", "admin-k")[0] == 200
    assert daemon.get("/status", headers=auth("admin-k"))[0] == 200
    code, body = daemon.get("/status")
    assert (code, body["error"]["code"]) == (401, "invalid_admin_key")
    code, activity = daemon.get("/api/activity", headers=auth("admin-k"))
    assert [r["key"] for r in activity["data"]] == ["apiKeys[0]", "adminKeys[0]"]
    assert http("GET", daemon.url + "/v1/models", headers=auth("api-k"))[0] == 200


def test_keys_new_prints_a_key_once_and_yaml_that_accepts_it(tmp_path, capsys):
    import re

    import yaml

    from swapd.cli import main
    from swapd.config.loader import load_config
    from swapd.http.keys import identify

    assert main(["keys", "new", "agent", "--models", "small*,qwen", "--role", "operator",
                 "--no-swap", "--tokens-per-day", "5000"]) == 0
    out = capsys.readouterr().out
    secret = re.search(r"^  (sk-swapd-\S+)$", out, re.M)[1]  # type: ignore[index]
    snippet = yaml.safe_load(out[out.index("keys:"):])
    assert secret not in yaml.safe_dump(snippet)  # the config holds only its SHA-256
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"models": {"small": {"cmd": "x"}}, **snippet}))
    key = identify(load_config(path).config, secret)
    assert key is not None
    assert (key.name, key.models, key.role, key.swap, key.tokens_per_day) == (
        "agent", ("small*", "qwen"), "operator", False, 5000)
    assert main(["keys", "new", "bad name"]) == 2


def test_keys_list_shows_scopes_limits_expiry_and_todays_usage(daemon, capsys):
    from swapd.cli import main

    assert chat(daemon, "slow", "tuner-k")[0] == 200
    assert main(["keys", "list", "--config", str(daemon.config_path), "--key", "alice-k"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "NAME" in lines and "ROLE" in lines["NAME"] and "TODAY" in lines["NAME"]
    assert "1 req, 7 tok of 10" in lines["tuner"] and "10 tokens/day" in lines["tuner"]
    assert "small*" in lines["agent"] and "no swap" in lines["agent"]
    assert "2020-01-01 (expired)" in lines["old"]
    assert "operator" in lines["alice"] and "0 req, 0 tok" in lines["alice"]
    assert "apiKeys[0]" in lines
    # Without the key it needs, it says so and still prints what the config holds.
    assert main(["keys", "list", "--config", str(daemon.config_path)]) == 1
    captured = capsys.readouterr()
    assert "cannot read today's usage" in captured.err and "tuner" in captured.out


def test_a_key_added_by_a_reload_works_without_a_restart(start_swapd, tmp_path):
    import signal

    import yaml

    cfg = config(tmp_path)
    daemon = start_swapd(cfg)
    assert daemon.get("/v1/models", headers=auth("late-k"))[0] == 401
    on_disk = yaml.safe_load(daemon.config_path.read_text())
    on_disk["keys"] = {**on_disk["keys"], "late": {"key": "late-k", "models": ["small"]}}
    daemon.config_path.write_text(yaml.safe_dump(on_disk, sort_keys=False))
    daemon.signal(signal.SIGHUP)
    assert wait_until(lambda: daemon.get("/v1/models", headers=auth("late-k"))[0] == 200,
                      timeout=20)
    _, listing = daemon.get("/v1/models", headers=auth("late-k"))
    assert [m["id"] for m in listing["data"]] == ["small"]
    # Its series appear with it.
    _, text = daemon.get("/metrics")
    assert metric_value(text, "swapd_key_tokens_total", key="late", kind="prompt") == 0
    assert 'swapd_key_tokens_total{key="late",kind="prompt"}' in text
