"""llama-swap's keys added after v250 (issue 22 item 8): each loads with its meaning, or one
warning that names the key and says why it changes nothing here."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from swapd.config.nodes import ConfigError
from swapd.config.routing import check_lines
from tests.support import fake_cmd, metric_value, model, stream_lines
from tests.support.routing import error, load


def warned(result_warnings: tuple[str, ...], key: str) -> list[str]:
    return [w for w in result_warnings if w.split(":")[0] == key]


def test_recent_keys_with_their_meaning(tmp_path: Path) -> None:
    result = load(tmp_path, """
        globalConcurrencyLimit: 8
        security:
          cors:
            allowedOrigins: ["https://dash.example.com", "http://localhost:5173"]
        metrics: {llamaSwapNames: true}
        profiles:
          coding: {pins: {llm: qwen-model}}
        hooks:
          on_startup: {profile: coding, preload: [big]}
        """)
    config = result.config
    assert config.global_concurrency_limit == 8
    assert config.cors_allow_origins == ("https://dash.example.com", "http://localhost:5173")
    assert config.llamaswap_metric_names is True
    assert config.startup_profile == "coding"
    assert config.preload == ("big",)
    assert result.warnings == ()
    printed = "\n".join(check_lines(config))
    assert "globalConcurrencyLimit: 8" in printed and "startup profile: coding" in printed
    defaults = load(tmp_path, "logLevel: info\n").config
    assert (defaults.global_concurrency_limit, defaults.startup_profile,
            defaults.llamaswap_metric_names) == (0, None, False)


def test_swappable_false(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text('models:\n  a: {cmd: "a", swappable: false}\n  b: {cmd: "b"}\n')
    from swapd.config.loader import load_config

    config = load_config(path, environ={}).config
    assert config.models["a"].swappable is False and config.models["b"].swappable is True
    assert "swappable: false (a request for another model never stops them): a" in \
        check_lines(config)
    path.write_text('models:\n  a: {cmd: "a", swappable: "no"}\n')
    with pytest.raises(ConfigError, match=r"models\.a\.swappable: must be true or false"):
        load_config(path, environ={})


def test_recent_keys_that_change_nothing_say_why(tmp_path: Path) -> None:
    result = load(tmp_path, """
        security:
          cors: {allowCredentials: true, maxAge: 600}
        store: {captureDir: /var/lib/ls/captures, captureMaxMB: 512}
        policies:
          coding-defaults: |
            default temperature to 0.2
        hooks:
          on_request: |
            deny 400 "messages is required"
              when messages is missing
          on_startup: {profile: nope}
        peers:
          lab: {proxy: "http://10.0.0.9:1", models: [far],
                filters: {policy: "remove reasoning_effort"}}
        """)
    w = result.warnings
    for key in ("security.cors.allowCredentials", "security.cors.maxAge", "store.captureDir",
                "store.captureMaxMB", "policies.coding-defaults", "hooks.on_request",
                "peers.lab.filters.policy", "hooks.on_startup.profile"):
        assert len(warned(w, key)) == 1, (key, w)
    assert "refuses nothing" in warned(w, "hooks.on_request")[0]
    assert "in memory only" in warned(w, "store.captureDir")[0]
    assert "not a defined profile" in warned(w, "hooks.on_startup.profile")[0]
    assert not any("not supported" in x for x in w), w
    assert result.config.startup_profile is None
    model = load(tmp_path, "x: 1\n").warnings  # an unknown key is still called unknown
    assert any("x" == m.split(":")[0] for m in model)


def test_model_filter_policy_warns(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text('models:\n  a:\n    cmd: "a"\n    filters: {policy: "remove x"}\n')
    from swapd.config.loader import load_config

    warnings = load_config(path, environ={}).warnings
    assert [w.split(":")[0] for w in warnings].count("models.a.filters.policy") == 1


def test_security_cors_origins_are_bare_origins(tmp_path: Path) -> None:
    err = error(tmp_path, """
        security: {cors: {allowedOrigins: ["https://dash.example.com/"]}}
        """)
    assert err.key_path == "security.cors.allowedOrigins[0]"
    both = load(tmp_path, """
        cors: {allowOrigins: ["https://a.example"]}
        security: {cors: {allowedOrigins: ["https://b.example"]}}
        """)
    assert both.config.cors_allow_origins == ("https://a.example",)
    assert len(warned(both.warnings, "security.cors.allowedOrigins")) == 1


# -- on a running swapd ---------------------------------------------------------------------


def test_global_concurrency_limit_and_startup_profile(start_swapd: Any) -> None:
    """globalConcurrencyLimit: 1: while one stream is served, a request for any model gets
    429 at once (no wait), counted under its model; once it ended, the next is served.
    hooks.on_startup.profile is active from the start."""
    daemon = start_swapd({
        "globalConcurrencyLimit": 1,
        "profiles": {"coding": {"pins": {"llm": "b"}}},
        "hooks": {"on_startup": {"profile": "coding"}},
        "groups": {"both": {"swap": False, "members": ["a", "b"]}},
        "models": {
            "a": model(fake_cmd("--stream-tokens", "400", "--token-delay", "0.02", name="a")),
            "b": model(fake_cmd(name="b")),
        },
    })
    assert daemon.get("/api/profiles")[1]["active"] == "coding"
    assert daemon.post("/v1/chat/completions", {"model": "llm", "messages": []})[0] == 200
    lines = stream_lines(daemon.url + "/v1/chat/completions",
                         {"model": "a", "messages": [], "stream": True})
    first, _ = next(lines)  # a's stream is being served
    assert first.startswith("data:")
    t0 = time.monotonic()
    code, body = daemon.post("/v1/chat/completions", {"model": "b", "messages": []})
    refused_in = time.monotonic() - t0
    assert code == 429 and body["error"]["code"] == "global_concurrency_limit", body
    rest = [line for line, _ in lines]  # a's stream runs to its end
    streamed_for = time.monotonic() - t0
    assert "data: [DONE]" in rest
    # At once: not after a's stream (the reference, measured here) had ended.
    assert refused_in < streamed_for / 2, (refused_in, streamed_for)
    assert daemon.post("/v1/chat/completions", {"model": "b", "messages": []})[0] == 200
    scrape = daemon.get("/metrics")[1]
    assert metric_value(scrape, "swapd_requests_total", model="b", code="429") == 1


def test_swappable_false_answers_409_and_unload_frees_it(start_swapd: Any) -> None:
    daemon = start_swapd({"models": {"big": model(fake_cmd(name="big"), swappable=False),
                                     "small": model(fake_cmd(name="small"))}})
    assert daemon.post("/v1/chat/completions", {"model": "big", "messages": []})[0] == 200
    code, body = daemon.post("/v1/chat/completions", {"model": "small", "messages": []})
    assert code == 409 and body["error"]["code"] == "model_not_swappable", body
    assert "POST /models/big/unload" in body["error"]["message"]
    assert daemon.status()["models"]["big"]["state"] == "ready"
    assert daemon.post("/models/big/unload")[0] == 200
    assert daemon.post("/v1/chat/completions", {"model": "small", "messages": []})[0] == 200
