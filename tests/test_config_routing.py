"""Loading llama-swap's routing keys: what they become, and bad values refused with the
key path (exit 2 in `swapd check`), never silently ignored."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from swapd.cli import format_check
from swapd.config.loader import load_config
from swapd.config.nodes import ConfigError
from swapd.placement.matrix import expand, solve
from tests.support.routing import error, load


def test_matrix_router(tmp_path: Path) -> None:
    result = load(tmp_path, """
        routing:
          router:
            use: matrix
            settings:
              matrix:
                vars: {g: gemma-model, v: voxtral-model}
                evict_costs: {v: 50}
                sets:
                  tts: "(g | qwen-model) & v"
                  alone: big
        """)
    cfg = result.config
    assert str(cfg.router) == "matrix" and cfg.matrix is not None
    assert expand(cfg.matrix, "tts") == [("gemma-model", "voxtral-model"),
                                         ("qwen-model", "voxtral-model")]
    assert cfg.matrix.cost("voxtral-model") == 50
    assert solve(cfg.matrix, "big", ["gemma-model"]).evict == ("gemma-model",)
    assert not result.warnings
    text = format_check(result)
    assert "router: matrix" in text
    assert "  tts: (g | qwen-model) & v → [gemma-model, voxtral-model] " \
           "[qwen-model, voxtral-model]" in text
    assert "  evict_costs: voxtral-model=50 (others 1)" in text


def test_legacy_top_level_matrix(tmp_path: Path) -> None:
    cfg = load(tmp_path, "matrix: {sets: {pair: 'gemma-model & big'}}\n").config
    assert str(cfg.router) == "matrix" and cfg.matrix is not None
    assert expand(cfg.matrix, "pair") == [("gemma-model", "big")]


def test_groups_are_unused_under_matrix(tmp_path: Path) -> None:
    result = load(tmp_path, """
        routing:
          router:
            use: matrix
            settings:
              groups: {g: {members: [big]}}
              matrix: {sets: {s: big}}
        """)
    assert result.config.groups == ()
    assert "routing.router.settings.groups: not used: routing.router.use is matrix" in \
        result.warnings


@pytest.mark.parametrize(("text", "path", "message"), [
    ("routing: {router: {use: matrix}}", "routing.router.settings.matrix", "required"),
    ("routing: {router: {use: magic}}", "routing.router.use", "must be group, matrix or memory"),
    ("routing: {router: {use: matrix, settings: {matrix: {sets: {s: 'big & ghost'}}}}}",
     "routing.router.settings.matrix.sets", "unknown var or model 'ghost'"),
    ("routing: {router: {use: matrix, settings: {matrix: {sets: {s: 'big &'}}}}}",
     "routing.router.settings.matrix.sets", "set 's'"),
    ("routing: {router: {use: matrix, settings: {matrix: {sets: {}}}}}",
     "routing.router.settings.matrix.sets", "at least one"),
    ("routing: {router: {use: matrix, settings: {matrix: {vars: {x: qwen}, sets: {s: x}}}}}",
     "routing.router.settings.matrix.vars.x", "not a model id"),
    ("routing: {router: {use: matrix, settings: {matrix: {vars: {'a b': big}, sets: {s: big}}}}}",
     "routing.router.settings.matrix.vars.a b", "1-32"),
    ("routing: {router: {use: matrix, settings: {matrix: {evict_costs: {big: 0}, "
     "sets: {s: big}}}}}", "routing.router.settings.matrix.evict_costs.big", "> 0"),
    ("routing: {router: {use: matrix, settings: {matrix: {evict_costs: {ghost: 2}, "
     "sets: {s: big}}}}}", "routing.router.settings.matrix.evict_costs.ghost", "not a var"),
    ("routing: {scheduler: {use: lifo}}", "routing.scheduler.use", "must be fifo"),
    ("routing: {scheduler: {settings: {fifo: {priority: {big: high}}}}}",
     "routing.scheduler.settings.fifo.priority.big", "integer"),
    ("selectors: {big: {strategy: pin, targets: [qwen]}}", "selectors.big", "already a model"),
    ("selectors: {s: {strategy: fastest, targets: [big]}}", "selectors.s.strategy",
     "warm, pin or spillover"),
    ("selectors: {s: {strategy: pin, targets: [t]}, t: {strategy: pin, targets: [big]}}",
     "selectors.s.targets[0]", "cannot chain"),
    ("selectors: {s: {strategy: spillover, targets: [big, qwen]}}", "selectors.s.targets",
     "run together"),
    ("selectors: {s: {strategy: spillover, targets: [big, gemma-model], "
     "settings: {spillover: 0}}}", "selectors.s.settings.spillover", "≥ 1"),
    ("selectors: {s: {strategy: spillover, targets: [qwen, qwen-model]}}",
     "selectors.s.targets[1]", "again"),
    ("peers: {p: {proxy: 'ftp://x', models: [m]}}", "peers.p.proxy", "http"),
    ("peers: {p: {proxy: 'http://x:1'}}", "peers.p.models", "required"),
    ("peers: {p: {proxy: 'http://x:1', models: [m], timeouts: {connect: -1}}}",
     "peers.p.timeouts.connect", "≥ 0"),
    ("profiles: {p: {description: x}}", "profiles.p.pins", "at least one pin"),
    ("upstream: {ignorePaths: ['(unclosed']}", "upstream.ignorePaths[0]",
     "invalid regular expression"),
    ("logToStdout: sometimes", "logToStdout", "proxy, upstream, both, none"),
    ("performance: {every: 2s}", "performance.every", "at least 5s"),
    ("performance: {every: soon}", "performance.every", "duration"),
])
def test_bad_values_name_their_key_path(tmp_path: Path, text: str, path: str,
                                        message: str) -> None:
    err = error(tmp_path, text)
    assert err.key_path == path, str(err)
    assert message in str(err), str(err)


def test_peer_names_must_not_collide_with_local_names(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent("""
        models:
          org/m: {cmd: x}
        peers:
          org: {proxy: "http://10.0.0.2:1", models: [m]}
        """))
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.key_path == "peers.org.models" and "reserved" in str(info.value)


def test_model_level_keys(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent("""
        models:
          m:
            cmd: srv --port ${PORT}
            aliases: [explicit]
            filters:
              setParams: {temperature: 0.5}
              setParamsByID:
                "${MODEL_ID}": {effort: medium}
                "${MODEL_ID}:high": {effort: high, model: nope}
                explicit: {effort: low}
            timeouts: {connect: 5, responseHeader: 0}
            capabilities: {in: [text, image], out: [text], tools: true, context: 8192}
            compat: {ignoreWebsockets: true}
          n:
            cmd: srv --port ${PORT}
            capabilities: {in: [], tools: false}
        """))
    result = load_config(path, environ={})
    m = result.config.models["m"]
    assert m.aliases == ("explicit", "m:high")  # ids become aliases, the model id does not
    assert m.set_params_by_id == {"m": {"effort": "medium"}, "m:high": {"effort": "high"},
                                  "explicit": {"effort": "low"}}
    assert m.timeouts is not None and (m.timeouts.connect, m.timeouts.idle_conn) == (5, 90)
    assert m.capabilities is not None and m.capabilities.context == 8192
    assert result.config.models["n"].capabilities is None  # all-zero: none
    assert result.config.models["n"].timeouts is None
    assert result.config.resolve("m:high") is m
    assert any(w.startswith("models.m.filters.setParamsByID.m:high.model: ") for w in
               result.warnings)
    assert any(w.startswith("models.m.compat.ignoreWebsockets: swapd does not relay websocket")
               for w in result.warnings)
    assert not any("not supported" in w for w in result.warnings)


@pytest.mark.parametrize(("extra", "path", "message"), [
    ("filters: {setParamsByID: {other: {x: 1}}}", "models.m.aliases[0]", "already a model id"),
    ("capabilities: {in: [smell]}", "models.m.capabilities.in[0]", "text, audio, image"),
    ("capabilities: {context: -1}", "models.m.capabilities.context", "≥ 0"),
    ("timeouts: {idleConn: x}", "models.m.timeouts.idleConn", "integer"),
])
def test_bad_model_level_keys(tmp_path: Path, extra: str, path: str, message: str) -> None:
    file = tmp_path / "config.yaml"
    file.write_text(f"models:\n  other: {{cmd: o}}\n  m:\n    cmd: x\n    {extra}\n")
    with pytest.raises(ConfigError) as info:
        load_config(file, environ={})
    assert message in str(info.value), str(info.value)


def test_priority_names_and_aliases(tmp_path: Path) -> None:
    result = load(tmp_path, """
        routing:
          scheduler:
            use: fifo
            settings: {fifo: {priority: {qwen: 10, big: 5, nobody: 1}}}
        """)
    assert result.config.priority == {"qwen-model": 10, "big": 5}
    assert result.warnings == (
        'routing.scheduler.settings.fifo.priority.nobody: "nobody" is not a defined model, '
        'ignored',)
    assert "priority: qwen-model=10, big=5" in format_check(result)


def test_selectors_profiles_peers_in_check(tmp_path: Path) -> None:
    result = load(tmp_path, """
        groups:
          pool: {swap: false, members: [gemma-model, big]}
        peers:
          lab: {proxy: "http://10.0.0.9:28080/", apiKey: sk-secret-1, models: [far]}
        selectors:
          s: {strategy: spillover, targets: [gemma-model, big, lab/far], settings: {spillover: 3}}
          w: {strategy: warm, targets: [qwen, ghost], name: W, metadata: {k: 1}}
        profiles:
          night: {pins: {chat: s, big: ~, far: ghost}}
        """)
    cfg = result.config
    assert cfg.peers["lab"].proxy == "http://10.0.0.9:28080"  # no trailing slash
    assert cfg.peer_routes == {"lab/far": ("lab", "far"), "far": ("lab", "far")}
    assert cfg.selectors["w"].targets == ("qwen",) and cfg.selectors["w"].metadata == {"k": 1}
    assert cfg.profiles["night"].pins == (("chat", "s"), ("big", None))
    text = format_check(result)
    assert "selector s: spillover → gemma-model, big, lab/far spillover=3" in text
    assert "profile night: chat → s, big → 404" in text
    assert "peer lab: http://10.0.0.9:28080 (apiKey set) models: far" in text
    assert "sk-secret-1" not in text
    assert sorted(w.split(":")[0] for w in result.warnings) == [
        "profiles.night.pins.far", "selectors.w.targets[1]"]


def test_warm_targets_must_be_local(tmp_path: Path) -> None:
    err = error(tmp_path, """
        peers: {lab: {proxy: "http://10.0.0.9:1", models: [far]}}
        selectors: {w: {strategy: warm, targets: [far]}}
        """)
    assert err.key_path == "selectors.w.targets[0]" and "local" in str(err)


def test_no_effect_keys_say_why(tmp_path: Path) -> None:
    result = load(tmp_path, """
        logTimeFormat: rfc3339
        logRequests: true
        metricsMaxInMemory: 500
        store: {path: /tmp/x.sqlite}
        logToStdout: none
        performance: {disabled: true, every: 1m}
        """)
    keys = [w.split(":")[0] for w in result.warnings]
    assert keys == ["logToStdout", "performance.every", "logTimeFormat", "logRequests",
                    "store.path"]
    # metricsMaxInMemory is llama-swap's name for activity.size (request records kept)
    assert result.config.activity_size == 500
    both = load(tmp_path, "metricsMaxInMemory: 500\nactivity: {size: 20}\n")
    assert both.config.activity_size == 20
    assert [w.split(":")[0] for w in both.warnings] == ["metricsMaxInMemory"]
    assert not any("not supported" in w for w in result.warnings)
    assert not result.config.gpu_sampling and str(result.config.log_to_stdout) == "none"
    quiet = load(tmp_path, "logTimeFormat: ''\nlogToStdout: proxy\n")
    assert quiet.warnings == () and str(quiet.config.log_to_stdout) == "proxy"
    assert str(load(tmp_path, "").config.log_to_stdout) == "both"  # unchanged when absent
