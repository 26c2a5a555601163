"""The config loader: llama-swap's format, swapd's keys, macros, errors with key paths."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from swapd.cli import format_check
from swapd.config.loader import load_config, load_model_entry
from swapd.config.nodes import ConfigError, include_files, split_host_port
from swapd.config.presets import EngineKind
from swapd.config.types import Config, LoadResult, RestartPolicy

COMPAT = Path(__file__).resolve().parents[2] / "shared" / "compat"
if not COMPAT.is_dir():  # the repository checked out on its own
    COMPAT = Path("/work/shared/compat")
ENV = {"HOME": "/home/spark", "API_KEY_1": "sk-one", "API_KEY_2": "sk-two"}
needs_compat = pytest.mark.skipif(not COMPAT.is_dir(), reason="shared/compat not present")


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None,
         name: str = "config.yaml") -> LoadResult:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return load_config(path, environ=environ or {})


def error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, environ)
    return info.value


# -- the real llama-swap configs ---------------------------------------------------------


@needs_compat
def test_compat_example_loads_with_warnings() -> None:
    result = load_config(COMPAT / "llama-swap.config.example.yaml", environ=ENV)
    cfg = result.config
    assert list(cfg.models) == ["gpt-oss-120b", "unlisted-model", "docker-llama"]
    assert cfg.health_check_timeout == 500  # not clamped, not defaulted
    assert cfg.queue_timeout == 560
    assert cfg.start_port == 10001 and cfg.send_loading_state
    assert cfg.api_keys == ("sk-hunter2", cfg.api_keys[1], "sk-one", "sk-two")
    assert cfg.source == str(COMPAT / "llama-swap.config.example.yaml")

    gpt = cfg.models["gpt-oss-120b"]
    assert gpt.cmd == (
        "/path/to/llama-server/llama-server-ec9e0301", "--port", "10001",
        "--model", "path/to/gpt-oss-120B.gguf", "--ctx-size", "16384", "--temperature", "0.7",
    )
    assert gpt.proxy == "http://127.0.0.1:8999"
    assert gpt.check_endpoint == "/custom-endpoint"
    assert gpt.ttl == 60 and gpt.unload_timeout == 10
    assert gpt.env == (("CUDA_VISIBLE_DEVICES", "0,1,2"),)
    # setParamsByID ids other than the model id become aliases (llama-swap)
    assert gpt.aliases == ("gpt-4o-mini", "gpt-oss-120b:high", "gpt-oss-120b:low")
    assert gpt.use_model_name == "openai/gpt-oss-120B"
    assert gpt.name == "gpt-oss 120B" and gpt.description == "A thinking model from OpenAI"
    assert gpt.strip_params == ("temperature", "top_p", "top_k")
    assert gpt.set_params == {"temperature": 0.7, "top_p": 0.9}
    assert gpt.send_loading_state is False  # per-model override of the global true
    meta = gpt.metadata
    assert meta["port"] == 10001 and isinstance(meta["port"], int)
    assert meta["temperature"] == 0.7
    assert meta["note"] == "The gpt-oss-120b is running on port 10001 temp=0.7, context=16384"
    assert meta["a_list"] == [1, 1.23, "macros are OK in list and dictionary types: gpt-oss-120b"]
    assert meta["an_obj"] == {"a": "1", "b": 2, "c": [0.7, False, "model: gpt-oss-120b"]}

    unlisted = cfg.models["unlisted-model"]
    assert unlisted.unlisted and unlisted.proxy == "http://127.0.0.1:10002"
    docker = cfg.models["docker-llama"]
    assert docker.proxy == "http://127.0.0.1:10003"
    assert docker.cmd[:4] == ("docker", "run", "--name", "docker-llama")
    assert "10003:8080" in docker.cmd
    assert docker.cmd_stop == ("docker", "stop", "docker-llama")

    groups = {g.name: g for g in cfg.groups}
    assert groups["group2"].members == ("docker-llama",)  # undefined members dropped
    assert (groups["group2"].swap, groups["group2"].exclusive) == (False, False)
    assert groups["forever"].persistent and groups["group1"].swap
    assert cfg.preload == ()

    # llama-swap's capture buffer and activity session headers are swapd's too (/ui).
    assert cfg.capture_buffer_mb == 15
    assert cfg.session_headers == ("X-Session-ID", "X-Litellm-Session-Id")
    # llama-swap's routing keys are loaded, never "not supported"
    for key in ["logTimeFormat", "logToStdout", "metricsMaxInMemory", "performance", "upstream",
                "profiles", "selectors", "peers", "routing", "models.gpt-oss-120b.timeouts",
                "models.gpt-oss-120b.compat", "models.gpt-oss-120b.capabilities",
                "models.gpt-oss-120b.filters.setParamsByID"]:
        assert not [w for w in result.warnings
                    if w.startswith(key) and "not supported" in w], key
    assert gpt.set_params_by_id == {
        "gpt-oss-120b": {"chat_template_kwargs": {"reasoning_effort": "medium"}},
        "gpt-oss-120b:high": {"chat_template_kwargs": {"reasoning_effort": "high"}},
        "gpt-oss-120b:low": {"chat_template_kwargs": {"reasoning_effort": "low"}},
    }
    assert gpt.timeouts is not None and gpt.timeouts.keepalive == 0
    assert gpt.timeouts.response_header == 60 and gpt.timeouts.idle_conn == 90
    assert gpt.capabilities is not None and gpt.capabilities.tools
    assert gpt.capabilities.inputs == ("text", "audio", "image")
    assert gpt.capabilities.context == 32000
    assert str(cfg.router) == "group" and cfg.matrix is None
    assert "routing.router.settings.matrix: not used: routing.router.use is group (set it to " \
        "matrix)" in result.warnings
    assert cfg.priority == {}  # A, B, C, D are not defined models
    assert [w for w in result.warnings if w.startswith("routing.scheduler.settings.fifo")] == [
        f'routing.scheduler.settings.fifo.priority.{k}: "{k}" is not a defined model, ignored'
        for k in "ABCD"]
    assert set(cfg.selectors) == {"coding-model", "llm-plan", "llama"}
    assert cfg.selectors["coding-model"].targets == ("gpt-oss-120b",)
    assert cfg.selectors["coding-model"].name == "Coding Model"
    assert cfg.selectors["llm-plan"].targets == ("gpt-oss-120b", "z-ai/glm-4.7")
    assert cfg.selectors["llama"].targets == ("docker-llama",)
    assert cfg.selectors["llama"].spillover == 4
    coding = cfg.profiles["coding"]
    assert coding.pins == (("llm-code", "gpt-oss-120b"), ("image-gen", None))
    assert set(cfg.peers) == {"llama-swap-peer", "openrouter"}
    assert cfg.peers["openrouter"].api_key is None
    assert cfg.peers["openrouter"].api_key_unset == "OPENROUTER_API_KEY"
    assert cfg.peers["openrouter"].set_params == {
        "provider": {"data_collection": "deny", "zdr": True}}
    assert cfg.peers["openrouter"].strip_params == ("temperature", "top_p")
    assert cfg.peer_routes["z-ai/glm-4.7"] == ("openrouter", "z-ai/glm-4.7")
    assert cfg.peer_routes["llama-swap-peer/embeddings/model_c"] == (
        "llama-swap-peer", "embeddings/model_c")
    assert [p.pattern for p in cfg.ignore_paths] == [
        r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$", r"^\/ws$|^\/api\/jobs$"]
    assert str(cfg.log_to_stdout) == "proxy" and cfg.gpu_sampling
    assert any("modelA" in w and "not a defined model" in w for w in result.warnings)
    assert any(w.startswith("hooks.on_startup.preload[0]:") for w in result.warnings)
    # an unset variable in a peer's apiKey is a warning: the rest of the config is usable
    assert "OPENROUTER_API_KEY" not in ENV
    assert any(w.startswith("peers.openrouter.apiKey: environment variable OPENROUTER_API_KEY "
                            "is not set") for w in result.warnings)


@needs_compat
def test_compat_example_fails_naming_the_unset_variable() -> None:
    env = {k: v for k, v in ENV.items() if k != "API_KEY_1"}
    with pytest.raises(ConfigError) as info:
        load_config(COMPAT / "llama-swap.config.example.yaml", environ=env)
    assert "API_KEY_1" in str(info.value)
    assert info.value.key_path == "apiKeys[2]"
    assert info.value.file and info.value.file.endswith("llama-swap.config.example.yaml")


@needs_compat
def test_compat_aider_and_docker_load() -> None:
    aider = load_config(COMPAT / "llama-swap.aider-qwq-coder.yaml", environ={})
    assert aider.config.health_check_timeout == 300 and aider.config.log_level == "debug"
    qwen = aider.config.models["qwen-coder-32B"]
    assert qwen.aliases == ("coder",) and qwen.proxy == "http://127.0.0.1:8999"
    assert qwen.cmd[0] == "/path/to/llama-server" and qwen.cmd[-1] == "q8_0"
    qwq = aider.config.models["QwQ"]
    assert "top_k;top_p;min_p;temperature;dry;typ_p;xtc" in qwq.cmd  # quotes removed
    assert len(aider.warnings) == 1
    assert aider.warnings[0].startswith("profiles.aider: a list is llama-swap's old profile form")
    assert aider.config.resolve("coder") is qwen

    docker = load_config(COMPAT / "llama-swap.docker.config.example.yaml", environ={})
    assert set(docker.config.models) == {"qwen2.5", "smollm2", "z-image"}
    assert docker.config.models["z-image"].check_endpoint == "/"
    assert len(docker.config.models["z-image"].aliases) == 5
    assert [w.split(":")[0] for w in docker.warnings if "PORT" not in w] == ["logRequests"]
    assert docker.config.activity_size == 1000  # metricsMaxInMemory: 1000
    assert not any("not supported" in w for w in docker.warnings)


# -- defaults and swapd's keys ---------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    result = load(tmp_path, "models:\n  a:\n    cmd: server --port ${PORT}\n")
    cfg = result.config
    assert result.warnings == ()
    assert (cfg.listen, cfg.health_check_timeout, cfg.start_port) == ("127.0.0.1:28080", 120, 5800)
    assert (cfg.queue_timeout, cfg.max_queue, cfg.shutdown_timeout) == (180, 256, 30)
    assert (cfg.log_buffer_lines, cfg.max_body_bytes) == (2000, 64 * 1024 * 1024)
    assert cfg.source == str(tmp_path / "config.yaml")
    a = cfg.models["a"]
    assert a.cmd == ("server", "--port", "5800") and a.proxy == "http://127.0.0.1:5800"
    assert a.port == 5800 and a.check_endpoint == "/health"
    assert (a.ttl, a.unload_timeout, a.health_check_timeout) == (0, 10, 120)
    assert a.engine is None and a.gpu and a.restart == RestartPolicy()
    assert a.memory_release_timeout == 30 and a.cmd_stop is None


def test_swapd_keys(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
        listen: 0.0.0.0:9000
        adminKeys: [admin-1]
        stateDir: /var/lib/swapd
        maxQueue: 8
        healthCheckTimeout: 30
        shutdownTimeout: 5.5
        logBufferLines: 100
        maxBodyBytes: 1024
        globalTTL: 300
        unloadTimeout: 4
        logLevel: WARNING
        includeAliasesInList: true
        models:
          a:
            cmd: a --port ${PORT}
            engine: vllm
            gpu: false
            healthCheckTimeout: 900
            restart: {maxRetries: 5, backoffInitial: 0.5, backoffMax: 10}
            memoryReleaseTimeout: 12.5
            concurrencyLimit: 4
            ttl: -1
          b:
            cmd: b
            proxy: http://127.0.0.1:7000
            engine: llama.cpp
            ttl: 0
            unloadTimeout: 0
          c:
            cmd: c
            proxy: http://127.0.0.1:7001
            ttl: 1.5
            unloadTimeout: 30
            checkEndpoint: none
        """).config
    assert cfg.listen == "0.0.0.0:9000" and cfg.admin_keys == ("admin-1",)
    assert cfg.state_dir == "/var/lib/swapd" and cfg.max_queue == 8
    # queueTimeout defaults to the longest healthCheckTimeout (model a's 900) + 60
    assert cfg.queue_timeout == 960 and cfg.shutdown_timeout == 5.5
    assert cfg.log_level == "warn" and cfg.include_aliases_in_list
    a, b, c = cfg.models["a"], cfg.models["b"], cfg.models["c"]
    assert a.engine is EngineKind.VLLM and not a.gpu and a.health_check_timeout == 900
    assert a.restart == RestartPolicy(5, 0.5, 10.0) and a.memory_release_timeout == 12.5
    assert a.concurrency_limit == 4 and a.ttl == 300  # -1 means globalTTL
    assert b.engine is EngineKind.LLAMA_CPP and b.ttl == 0 and b.unload_timeout == 4
    assert c.ttl == 1.5 and c.unload_timeout == 30 and c.check_endpoint is None


def test_old_style_groups_and_preload_by_alias(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
        models:
          a: {cmd: a, proxy: "http://127.0.0.1:1", aliases: [alpha]}
          b: {cmd: b, proxy: "http://127.0.0.1:2"}
        groups:
          pair: {swap: false, members: [a, b]}
        hooks:
          on_startup:
            preload: [alpha, b]
        """).config
    assert cfg.groups[0].name == "pair" and cfg.groups[0].members == ("a", "b")
    assert cfg.groups[0].exclusive and not cfg.groups[0].swap
    assert cfg.preload == ("a", "b")


# -- macros ---------------------------------------------------------------------------


def test_macros_in_macros_per_model_override_and_model_id(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
        macros:
          ctx: 4096
          args: "--ctx-size ${ctx} --alias ${MODEL_ID}"
          server: "/bin/server ${args}"
        models:
          small:
            cmd: ${server}
          big:
            macros:
              ctx: 32768
              extra: "--threads ${threads}"
              threads: 8
            cmd: ${server} --x ${threads}
        """).config
    assert cfg.models["small"].cmd == ("/bin/server", "--ctx-size", "4096", "--alias", "small")
    assert cfg.models["big"].cmd == (
        "/bin/server", "--ctx-size", "32768", "--alias", "big", "--x", "8")


def test_macro_used_before_definition_is_an_error(tmp_path: Path) -> None:
    err = error(tmp_path, """
        macros:
          a: "x ${b}"
          b: "y"
        models: {m: {cmd: "${a}"}}
        """)
    assert err.key_path == "models.m.cmd" and "${b}" in str(err)


@pytest.mark.parametrize(("macros", "path", "words"), [
    ("PORT: 1", "macros.PORT", "reserved"),
    ("MODEL_ID: x", "macros.MODEL_ID", "reserved"),
    ("'bad name': 1", "macros.bad name", "must match"),
    ("self: 'a ${self}'", "macros.self", "itself"),
    ("list: [1, 2]", "macros.list", "string, number or boolean"),
])
def test_bad_macro_definitions(tmp_path: Path, macros: str, path: str, words: str) -> None:
    err = error(tmp_path, f"macros:\n  {macros}\nmodels: {{m: {{cmd: m}}}}\n")
    assert err.key_path == path and words in str(err)


def test_port_increments_in_file_order(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
        startPort: 9000
        macros:
          srv: "server --port ${PORT}"
        models:
          zeta: {cmd: "${srv}"}
          fixed: {cmd: fixed, proxy: "http://127.0.0.1:7000"}
          alpha: {cmd: "${srv}", cmdStop: "stop ${PORT} ${PID}", name: "alpha on ${PORT}"}
          beta: {cmd: "beta"}
        """).config
    assert cfg.models["zeta"].port == 9000 and cfg.models["zeta"].cmd[-1] == "9000"
    assert cfg.models["fixed"].port == 7000
    assert cfg.models["alpha"].port == 9001
    assert cfg.models["alpha"].cmd_stop == ("stop", "9001", "${PID}")
    assert cfg.models["alpha"].name == "alpha on 9001"
    assert cfg.models["beta"].port == 9002  # the default proxy uses ${PORT} too


def test_proxy_port_without_cmd_port_warns(tmp_path: Path) -> None:
    result = load(tmp_path, "models: {a: {cmd: server}}\n")
    assert result.config.models["a"].port == 5800
    assert [w for w in result.warnings if w.startswith("models.a.proxy:")]


def test_metadata_keeps_types(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
        macros: {flag: true, temp: 0.5, label: "x", alias_of_temp: "${temp}"}
        models:
          m:
            cmd: m --port ${PORT}
            metadata:
              port: ${PORT}
              flag: ${flag}
              temp: ${alias_of_temp}
              mixed: "t=${temp} f=${flag}"
              nested: [{id: "${MODEL_ID}"}, "${label}"]
              date: 2025-01-31
        """).config
    assert cfg.models["m"].metadata == {
        "port": 5800, "flag": True, "temp": 0.5, "mixed": "t=0.5 f=true",
        "nested": [{"id": "m"}, "x"], "date": "2025-01-31",
    }


def test_env_macros(tmp_path: Path) -> None:
    text = """
        startPort: ${env.FIRST_PORT}
        macros: {dir: "${env.MODELS}"}
        models:
          m:
            cmd: srv --model ${dir}/m.gguf --port ${PORT}
            env: ["TOKEN=${env.TOKEN}"]
        peers:
          p: {proxy: "http://10.0.0.2:8080", models: [x], apiKey: "${env.NOT_SET}"}
        """
    env = {"FIRST_PORT": "6000", "MODELS": "/models", "TOKEN": "t0k"}
    cfg = load(tmp_path, text, env).config
    assert cfg.start_port == 6000
    assert cfg.models["m"].cmd == ("srv", "--model", "/models/m.gguf", "--port", "6000")
    assert cfg.models["m"].env == (("TOKEN", "t0k"),)
    err = error(tmp_path, text, {"FIRST_PORT": "6000", "MODELS": "/m"})
    assert err.key_path == "models.m.env[0]" and "TOKEN" in str(err)


def test_unknown_macro_and_pid_outside_cmd_stop(tmp_path: Path) -> None:
    err = error(tmp_path, "models: {m: {cmd: 'srv ${nope}'}}\n")
    assert err.key_path == "models.m.cmd" and "unknown macro ${nope}" in str(err)
    err = error(tmp_path, "models: {m: {cmd: 'srv', proxy: 'http://h:1/${nope}'}}\n")
    assert err.key_path == "models.m.proxy"
    err = error(tmp_path, "models: {m: {cmd: 'kill ${PID}'}}\n")
    assert err.key_path == "models.m.cmd" and "cmdStop" in str(err)
    err = error(tmp_path, "models: {m: {cmd: srv, proxy: 'http://h:1', cmdStop: 'k ${PORT}'}}\n")
    assert err.key_path == "models.m.cmdStop"


# -- cmd ------------------------------------------------------------------------------


def test_cmd_comments_quoting_and_continuations(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
        models:
          m:
            cmd: |
              # a comment naming ${undefined} or ${env.UNSET} is dropped before macros
              /bin/server --port ${PORT}
                # indented comment
              --chat-template "{% if x %}a b{% endif %}" \\
              --name 'it''s' --empty ""
            cmdStop: |
              # stop it
              kill -TERM ${PID}
        """).config
    m = cfg.models["m"]
    assert m.cmd == ("/bin/server", "--port", "5800", "--chat-template",
                     "{% if x %}a b{% endif %}", "--name", "its", "--empty", "")
    assert m.cmd_stop == ("kill", "-TERM", "${PID}")


def test_cmd_errors(tmp_path: Path) -> None:
    assert error(tmp_path, "models: {m: {proxy: 'http://h:1'}}\n").key_path == "models.m.cmd"
    assert error(tmp_path, "models: {m: {cmd: '# only a comment'}}\n").key_path == "models.m.cmd"
    err = error(tmp_path, "models: {m: {cmd: 'srv \"unclosed'}}\n")
    assert err.key_path == "models.m.cmd" and "closing quotation" in str(err)
    assert error(tmp_path, "models: {m: {cmd: [a, b]}}\n").key_path == "models.m.cmd"


# -- errors ----------------------------------------------------------------------------


def test_ttl_error_message_names_file_and_key_path(tmp_path: Path) -> None:
    err = error(tmp_path, "models:\n  qwen:\n    cmd: q\n    ttl: abc\n")
    assert err.key_path == "models.qwen.ttl" and err.file == str(tmp_path / "config.yaml")
    assert str(err).endswith('models.qwen.ttl: must be an integer ≥ 0, got "abc"')
    assert str(err).startswith(str(tmp_path / "config.yaml"))


@pytest.mark.parametrize(("text", "path"), [
    ("healthCheckTimeout: 0\n", "healthCheckTimeout"),
    ("healthCheckTimeout: true\n", "healthCheckTimeout"),
    ("startPort: 70000\n", "startPort"),
    ("startPort: 1.5\n", "startPort"),
    ("globalTTL: -1\n", "globalTTL"),
    ("logLevel: loud\n", "logLevel"),
    ("listen: localhost\n", "listen"),
    ("maxQueue: 0\n", "maxQueue"),
    ("maxBodyBytes: big\n", "maxBodyBytes"),
    ("apiKeys: ['']\n", "apiKeys[0]"),
    ("apiKeys: ['a b']\n", "apiKeys[0]"),
    ("includeAliasesInList: yes please\n", "includeAliasesInList"),
    ("macros: [a]\n", "macros"),
])
def test_top_level_errors(tmp_path: Path, text: str, path: str) -> None:
    err = error(tmp_path, text + "models: {m: {cmd: m}}\n")
    assert err.key_path == path


@pytest.mark.parametrize(("entry", "path"), [
    ("ttl: -5", "models.m.ttl"),
    ("ttl: true", "models.m.ttl"),
    ("concurrencyLimit: 1.5", "models.m.concurrencyLimit"),
    ("concurrencyLimit: -1", "models.m.concurrencyLimit"),
    ("unlisted: 1", "models.m.unlisted"),
    ("proxy: 'ftp://h:1'", "models.m.proxy"),
    ("proxy: 'http://h:notaport'", "models.m.proxy"),
    ("env: ['NOEQUALS']", "models.m.env[0]"),
    ("env: {A: [1]}", "models.m.env.A"),
    ("engine: tgi", "models.m.engine"),
    ("restart: {maxRetries: -1}", "models.m.restart.maxRetries"),
    ("restart: {backoffInitial: 10, backoffMax: 1}", "models.m.restart.backoffMax"),
    ("metadata: {a: !!binary aGk=}", "models.m.metadata.a"),
    ("filters: {setParams: [1]}", "models.m.filters.setParams"),
    ("aliases: ['']", "models.m.aliases[0]"),
    ("healthCheckTimeout: 0", "models.m.healthCheckTimeout"),
    ("memoryReleaseTimeout: x", "models.m.memoryReleaseTimeout"),
])
def test_model_errors(tmp_path: Path, entry: str, path: str) -> None:
    err = error(tmp_path, f"models:\n  m:\n    cmd: m\n    {entry}\n")
    assert err.key_path == path, str(err)


def test_models_required_and_must_be_a_mapping(tmp_path: Path) -> None:
    assert error(tmp_path, "logLevel: info\n").key_path == "models"
    assert error(tmp_path, "models: [a]\n").key_path == "models"
    assert error(tmp_path, "models: {m: [a]}\n").key_path == "models.m"
    assert error(tmp_path, "- a\n").key_path is None


def test_yaml_problems(tmp_path: Path) -> None:
    err = error(tmp_path, "models:\n  m: {cmd: a}\n  m: {cmd: b}\n")
    assert "duplicate key 'm'" in str(err) and "line 3" in str(err)
    assert "invalid YAML" in str(error(tmp_path, "models: {m: [\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_alias_conflicts(tmp_path: Path) -> None:
    err = error(tmp_path, """
        models:
          a: {cmd: a, aliases: [x]}
          b: {cmd: b, aliases: [y, x]}
        """)
    assert err.key_path == "models.b.aliases[1]" and "alias of a" in str(err)
    err = error(tmp_path, "models:\n  a: {cmd: a}\n  b: {cmd: b, aliases: [a]}\n")
    assert err.key_path == "models.b.aliases[0]" and "model id" in str(err)


def test_model_in_two_groups_is_an_error(tmp_path: Path) -> None:
    err = error(tmp_path, """
        models: {a: {cmd: a}}
        groups:
          one: {members: [a]}
          two: {members: [a]}
        """)
    assert err.key_path == "groups.two.members[0]" and "one" in str(err)


def test_filters(tmp_path: Path) -> None:
    result = load(tmp_path, """
        macros: {t: 0.3}
        models:
          a:
            cmd: a
            filters:
              stripParams: [top_k, model, " top_p "]
              setParams: {model: other, temperature: "${t}", extra: {k: [1, "${MODEL_ID}"]}}
          b:
            cmd: b
            filters: {strip_params: "min_p,,min_p"}
        """)
    a = result.config.models["a"]
    assert a.strip_params == ("top_k", "top_p")
    assert a.set_params == {"temperature": 0.3, "extra": {"k": [1, "a"]}}
    assert result.config.models["b"].strip_params == ("min_p",)
    assert any(w.startswith("models.a.filters.stripParams:") for w in result.warnings)
    assert any(w.startswith("models.a.filters.setParams.model:") for w in result.warnings)


def test_env_forms_and_alias_mappings(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
        models:
          a:
            cmd: a
            env: {CUDA_VISIBLE_DEVICES: 0, FLAG: true, PORT_IS: "${PORT}"}
            aliases: [{id: "${MODEL_ID}-alias", name: ignored}, plain]
          b:
            cmd: b
            env: ["X=1", "Y=a=b", "X=2"]
            aliases: single
        """).config
    assert cfg.models["a"].env == (
        ("CUDA_VISIBLE_DEVICES", "0"), ("FLAG", "true"), ("PORT_IS", "5800"))
    assert cfg.models["a"].aliases == ("a-alias", "plain")
    assert cfg.models["b"].env == (("X", "2"), ("Y", "a=b"))
    assert cfg.models["b"].aliases == ("single",)


# -- include --------------------------------------------------------------------------


def test_include_merges_models_in_order(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "b.yaml").write_text(
        "models:\n  rb:\n    cmd: rb --port ${PORT} ${flags}\n    aliases: [bee]\n")
    (tmp_path / "recipes" / "a.yaml").write_text(
        "models:\n  ra:\n    cmd: ra --port ${PORT}\n    ttl: 5\nextra: 1\n")
    (tmp_path / "recipes" / "empty.yaml").write_text("")
    result = load(tmp_path, """
        include: recipes/*.yaml
        macros: {flags: "--fast"}
        models:
          main: {cmd: "main --port ${PORT}"}
        groups:
          g: {members: [ra, rb]}
        """)
    cfg = result.config
    assert list(cfg.models) == ["main", "ra", "rb"]
    assert [cfg.models[m].port for m in cfg.models] == [5800, 5801, 5802]
    assert cfg.models["rb"].cmd == ("rb", "--port", "5802", "--fast")
    assert cfg.resolve("bee") is cfg.models["rb"]
    assert cfg.groups[0].members == ("ra", "rb")
    assert f"{tmp_path / 'recipes' / 'a.yaml'}: extra: unknown key, ignored" in (
        result.warnings)


def test_include_alone_is_enough(tmp_path: Path) -> None:
    cfg = load(tmp_path, "include: recipes/*.yaml\n").config
    assert cfg.models == {} and cfg.include == "recipes/*.yaml"


def test_include_duplicate_id_names_both_files(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "dup.yaml").write_text("models:\n  main:\n    cmd: other\n")
    err = error(tmp_path, "include: recipes/*.yaml\nmodels: {main: {cmd: main}}\n")
    assert err.key_path == "models.main"
    assert str(tmp_path / "config.yaml") in str(err) and "dup.yaml" in str(err)
    assert err.file and err.file.endswith("dup.yaml")


def test_include_file_errors_name_that_file(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "bad.yaml").write_text("models:\n  r:\n    cmd: r\n    ttl: x\n")
    err = error(tmp_path, "include: recipes/*.yaml\nmodels: {}\n")
    assert err.file and err.file.endswith("bad.yaml") and err.key_path == "models.r.ttl"


# -- load_model_entry -------------------------------------------------------------------


def _base(tmp_path: Path) -> Config:
    return load(tmp_path, """
        startPort: 7000
        globalTTL: 60
        macros: {srv: "server --port ${PORT}"}
        models:
          a: {cmd: "${srv}", aliases: [alpha]}
          b: {cmd: "${srv}"}
        """).config


def test_load_model_entry(tmp_path: Path) -> None:
    base = _base(tmp_path)
    model = load_model_entry("new.model-1", {"cmd": "${srv} --id ${MODEL_ID}",
                                             "engine": "sglang"}, base)
    assert model.id == "new.model-1" and model.port == 7002  # 7000 and 7001 are taken
    assert model.cmd == ("server", "--port", "7002", "--id", "new.model-1")
    assert model.engine is EngineKind.SGLANG and model.ttl == 60
    replacing = load_model_entry("a", {"cmd": "x --port ${PORT}", "aliases": ["alpha"]}, base)
    assert replacing.port == 7000 and replacing.aliases == ("alpha",)
    with_env = load_model_entry("e", {"cmd": "x ${env.BIN}"}, base, environ={"BIN": "/b"})
    assert with_env.cmd == ("x", "/b")


@pytest.mark.parametrize("bad_id", ["../etc", "a/b", ".hidden", "", "a..b", "x" * 129, "a b"])
def test_load_model_entry_rejects_unsafe_ids(tmp_path: Path, bad_id: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_model_entry(bad_id, {"cmd": "x"}, _base(tmp_path))
    assert info.value.key_path == f"models.{bad_id}"


@pytest.mark.parametrize(("model_id", "entry", "path"), [
    ("n", {"cmd": "x", "ttl": "abc"}, "models.n.ttl"),
    ("n", {"proxy": "http://h:1"}, "models.n.cmd"),
    ("n", {"cmd": "x", "aliases": ["alpha"]}, "models.n.aliases[0]"),
    ("n", {"cmd": "x", "aliases": ["b"]}, "models.n.aliases[0]"),
    ("alpha", {"cmd": "x"}, "models.alpha"),
    ("n", ["cmd"], "models.n"),
    ("n", {"cmd": "x ${env.UNSET_VAR}"}, "models.n.cmd"),
])
def test_load_model_entry_errors(tmp_path: Path, model_id: str, entry: object, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_model_entry(model_id, entry, _base(tmp_path), environ={})
    assert info.value.key_path == path
    assert info.value.file is None


# -- swapd check ----------------------------------------------------------------------


def test_format_check(tmp_path: Path) -> None:
    result = load(tmp_path, """
        globalTTL: 90
        models:
          qwen:
            cmd: "srv --template 'a b' --port ${PORT}"
            aliases: [q, coder]
            engine: vllm
          helper:
            cmd: helper
            proxy: http://127.0.0.1:9100
            gpu: false
            ttl: 0
        groups:
          pair: {swap: false, members: [qwen, helper]}
        performance: {every: 10s}
        """)
    text = format_check(result)
    assert "qwen" in text and "aliases:  q, coder" in text
    assert "argv:     srv --template 'a b' --port 5800" in text
    assert "upstream: http://127.0.0.1:5800" in text and "ttl:      90s" in text
    assert "engine:   vllm" in text and "gpu:      no" in text
    assert "ttl:      0 (never unloaded)" in text
    assert "pair: swap=false exclusive=true persistent=false members=qwen, helper" in text
    assert text.splitlines()[-1] == ("warning: performance.every: swapd samples the GPU every "
                                     "second for /metrics; this interval is not used")


def test_load_config_uses_process_environment_by_default(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAPD_TEST_BIN", "/opt/bin/srv")
    path = tmp_path / "c.yaml"
    path.write_text("models: {m: {cmd: '${env.SWAPD_TEST_BIN}'}}\n")
    assert load_config(path).config.models["m"].cmd == ("/opt/bin/srv",)
    assert load_config(os.fspath(path)).config.source == str(path)


def test_env_values_keep_their_text_in_strings(tmp_path: Path) -> None:
    env = {"KEY": "0755", "N": "1_000", "T": "true", "F": "0.25"}
    cfg = load(tmp_path, """
        apiKeys: ["${env.KEY}"]
        unloadTimeout: ${env.F}
        models:
          m:
            cmd: "srv ${env.N}"
            gpu: ${env.T}
            metadata: {n: "${env.N}", f: "${env.F}"}
        """, env).config
    assert cfg.api_keys == ("0755",) and cfg.unload_timeout == 0.25
    m = cfg.models["m"]
    assert m.cmd == ("srv", "1_000") and m.gpu is True
    assert m.metadata == {"n": "1_000", "f": 0.25}


def test_yaml_anchors_and_merge_keys(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
        x-defaults: &defaults
          ttl: 30
          engine: vllm
        models:
          a:
            <<: *defaults
            cmd: a
          b:
            <<: *defaults
            cmd: b
            ttl: 5
        """).config
    assert cfg.models["a"].ttl == 30 and cfg.models["a"].engine is EngineKind.VLLM
    assert cfg.models["b"].ttl == 5


def test_split_host_port() -> None:
    assert split_host_port("0.0.0.0:28080") == ("0.0.0.0", 28080)
    assert split_host_port("[::1]:8080") == ("::1", 8080)
    assert split_host_port(":9000") == ("", 9000)  # every interface, as in Go
    for bad in ("28080", "host:", "host:0", "host:65536", "host:http"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            split_host_port(bad)


def test_include_files_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "recipes" / "deep").mkdir(parents=True)
    for name in ("b.yaml", "a.yaml", "deep/c.yaml", "x.txt"):
        (tmp_path / "recipes" / name).write_text("models: {}\n")
    main = str(tmp_path / "config.yaml")
    assert include_files(main, "recipes/*.yaml") == [
        str(tmp_path / "recipes" / n) for n in ("a.yaml", "b.yaml")]
    assert include_files(main, "recipes/**/*.yaml")[-1] == str(tmp_path / "recipes/deep/c.yaml")
    assert include_files(main, str(tmp_path / "recipes" / "a.yaml")) == [
        str(tmp_path / "recipes" / "a.yaml")]
