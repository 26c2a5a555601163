"""Engine presets: defaults and overrides through the real loader, and one real-process test per
engine against the fake engine playing that engine (late port, 503 while loading, lazy load,
worker grandchildren)."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from swapd.cli import format_check
from swapd.config.loader import load_config, load_model_entry
from swapd.config.presets import (
    PRESETS,
    EngineKind,
    FileWide,
    Recipe,
    engine_kind,
    preset_for,
    settle,
)
from swapd.config.types import ModelConfig
from swapd.engines import engine as engine_mod
from swapd.engines.launch import engine_environment
from tests.support import (
    FAKE_ENGINE,
    fake_cmd,
    free_port,
    metric_value,
    model,
    pid_alive,
    read_records,
    wait_until,
)


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(path, environ={} if environ is None else environ)


# -- defaults and overrides (pure) -------------------------------------------------------


@pytest.mark.parametrize("kind", list(EngineKind))
def test_preset_supplies_every_default(tmp_path: Path, kind: EngineKind) -> None:
    result = load(tmp_path, f"""
        models:
          m:
            cmd: server --port ${{PORT}}
            engine: {kind.value}
        """)
    m, preset = result.config.models["m"], PRESETS[kind]
    assert m.engine is kind and preset_for(kind) is preset
    assert m.check_endpoint == preset.check_endpoint
    assert m.health_check_timeout == preset.health_check_timeout
    assert m.unload_timeout == preset.unload_timeout
    assert m.env == preset.env and m.env_remove == preset.env_remove
    assert m.unload_request == preset.unload_request("m")
    assert result.warnings == ()


def test_preset_values_are_sized_for_a_spark() -> None:
    for preset in PRESETS.values():
        assert preset.unload_timeout >= 10, preset.engine
        assert preset.health_check_timeout >= 300, preset.engine  # minutes, not seconds
    for kind in (EngineKind.VLLM, EngineKind.SGLANG, EngineKind.TRTLLM):
        assert PRESETS[kind].health_check_timeout >= 900 and PRESETS[kind].unload_timeout >= 30
        assert ("PYTHONUNBUFFERED", "1") in PRESETS[kind].env
    assert PRESETS[EngineKind.OLLAMA].check_endpoint == "/"
    assert dict(PRESETS[EngineKind.OLLAMA].env)["OLLAMA_MAX_LOADED_MODELS"] == "1"
    assert [k for k in EngineKind if PRESETS[k].unload_path] == [EngineKind.OLLAMA]


def test_recipe_values_beat_the_preset(tmp_path: Path) -> None:
    m = load(tmp_path, """
        models:
          m:
            cmd: vllm serve x --port ${PORT}
            engine: vllm
            checkEndpoint: /v1/models
            healthCheckTimeout: 45
            unloadTimeout: 7
            env: [PYTHONUNBUFFERED=0, HF_HOME=/srv/hf, VLLM_PORT=5555]
        """).config.models["m"]
    assert (m.check_endpoint, m.health_check_timeout, m.unload_timeout) == ("/v1/models", 45, 7)
    assert m.env == (("PYTHONUNBUFFERED", "0"), ("HF_HOME", "/srv/hf"), ("VLLM_PORT", "5555"))
    # The recipe's env beats the preset's hygiene too: what it sets, the engine gets.
    env = engine_environment(m, {"VLLM_PORT": "tcp://10.0.0.1:80", "PATH": "/bin"})
    assert env["VLLM_PORT"] == "5555" and env["PYTHONUNBUFFERED"] == "0"
    none = load(tmp_path, """
        models:
          m: {cmd: "x --port ${PORT}", engine: sglang, checkEndpoint: none}
        """).config.models["m"]
    assert none.check_endpoint is None  # ready when the port opens


def test_preset_beats_global_defaults_and_recipe_beats_both(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
        healthCheckTimeout: 120
        unloadTimeout: 5
        models:
          plain: {cmd: "x --port ${PORT}"}
          vllm: {cmd: "x --port ${PORT}", engine: vllm}
          own: {cmd: "x --port ${PORT}", engine: vllm, healthCheckTimeout: 3000}
          zero: {cmd: "x --port ${PORT}", engine: trtllm, unloadTimeout: 0}
        """).config
    plain, vllm, own, zero = (cfg.models[k] for k in ("plain", "vllm", "own", "zero"))
    assert (plain.health_check_timeout, plain.unload_timeout, plain.env) == (120, 5, ())
    assert plain.check_endpoint == "/health" and plain.env_remove == () and not plain.unload_request
    assert (vllm.health_check_timeout, vllm.unload_timeout) == (1200, 30)
    assert own.health_check_timeout == 3000
    assert zero.unload_timeout == 5  # llama-swap: 0 means the global unloadTimeout
    # A request may wait for the longest start any model can take.
    assert cfg.queue_timeout == 3000 + 60
    explicit = load(tmp_path, """
        queueTimeout: 30
        models:
          vllm: {cmd: "x --port ${PORT}", engine: vllm}
        """).config
    assert explicit.queue_timeout == 30


def test_ollama_unload_request_names_the_upstream_model(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
        models:
          lane:
            cmd: ollama serve
            engine: ollama
            useModelName: gpt-oss:20b
            env: ["OLLAMA_HOST=127.0.0.1:${PORT}", OLLAMA_KEEP_ALIVE=10m]
          own-stop:
            cmd: ollama serve
            cmdStop: ollama stop gpt-oss:20b
            engine: ollama
            env: ["OLLAMA_HOST=127.0.0.1:${PORT}"]
        """)
    assert cfg.warnings == ()  # ${PORT} in env is how ollama listens: no "unused port" warning
    lane = cfg.config.models["lane"]
    path, body = lane.unload_request or ("", "")
    assert path == "/api/generate" and json.loads(body) == {"model": "gpt-oss:20b",
                                                            "keep_alive": 0}
    assert dict(lane.env) == {"OLLAMA_MAX_LOADED_MODELS": "1", "OLLAMA_KEEP_ALIVE": "10m",
                              "OLLAMA_HOST": f"127.0.0.1:{lane.port}"}
    # cmdStop is the recipe's own way to stop: the preset's unload request stands aside.
    assert cfg.config.models["own-stop"].unload_request is None


def test_environment_hygiene(tmp_path: Path) -> None:
    m = load(tmp_path, """
        models:
          m:
            cmd: llama-server --port ${PORT}
            engine: llama.cpp
            env: [LLAMA_ARG_N_PARALLEL=2]
        """).config.models["m"]
    inherited = {"LLAMA_ARG_MODEL": "/bogus.gguf", "LLAMA_ARG_PORT": "1", "PATH": "/bin",
                 "LLAMA_CACHE": "/srv/cache", "NOTIFY_SOCKET": "/run/systemd/notify"}
    env = engine_environment(m, inherited)
    assert env == {"PATH": "/bin", "LLAMA_CACHE": "/srv/cache", "LLAMA_ARG_N_PARALLEL": "2"}


def test_load_model_entry_applies_the_preset(tmp_path: Path) -> None:
    base = load(tmp_path, "unloadTimeout: 4\nmodels:\n  a: {cmd: 'x --port ${PORT}'}\n").config
    m = load_model_entry("sg", {"cmd": "x --port ${PORT}", "engine": "sglang"}, base)
    assert (m.health_check_timeout, m.unload_timeout) == (1200, 30)
    assert m.env_remove == PRESETS[EngineKind.SGLANG].env_remove
    o = load_model_entry("ol", {"cmd": "ollama serve", "engine": "ollama",
                                "env": {"OLLAMA_HOST": "127.0.0.1:${PORT}"}}, base)
    assert o.check_endpoint == "/" and o.unload_request is not None


def test_check_output_shows_the_preset_and_hides_env_values(tmp_path: Path) -> None:
    text = format_check(load(tmp_path, """
        models:
          lane:
            cmd: ollama serve
            engine: ollama
            env: ["OLLAMA_HOST=127.0.0.1:${PORT}", HF_TOKEN=hf_secret]
          big: {cmd: "x --port ${PORT}", engine: vllm}
        """))
    assert "engine:   ollama (preset defaults)" in text
    assert "upstream: http://127.0.0.1:5800 (ready: GET /)" in text
    assert "stop:     POST /api/generate (unload), then SIGTERM to the process group; " \
           "SIGKILL after 15s (unloadTimeout)" in text
    assert "start:    ready within 1200s (healthCheckTimeout)" in text
    assert "not inherited: VLLM_PORT, PYTHONHOME, PYTHONPATH" in text
    assert "HF_TOKEN" in text and "hf_secret" not in text


# -- each preset against a fake that behaves like its engine ------------------------------


def engine_log(daemon: Any) -> list[str]:
    code, text = daemon.get("/logs")
    assert code == 200
    return str(text).splitlines()


def index_of(lines: list[str], needle: str) -> int:
    return next(i for i, line in enumerate(lines) if needle in line)


def group_pids(records: list[dict[str, Any]]) -> list[int]:
    pids = [r["pid"] for r in records if r["event"] == "start"]
    return pids + [r["child"] for r in records if r["event"] == "grandchild"]


def stop_and_check_group_gone(daemon: Any, model_id: str, rec: Path) -> None:
    pids = group_pids(read_records(rec))
    assert len(pids) == 2, pids  # the engine and its worker
    code, body = daemon.post(f"/models/{model_id}/unload")
    assert code == 200 and body["unloaded"] == [model_id]
    wait_until(lambda: not any(pid_alive(p) for p in pids), 10, "engine and worker gone")
    # SIGTERM to the group was enough: no SIGKILL within the preset's grace.
    code, scrape = daemon.get("/metrics")
    assert metric_value(scrape, "swapd_engine_kills_total", model=model_id) == 0


def chat(daemon: Any, model_id: str) -> dict[str, Any]:
    code, body = daemon.post("/v1/chat/completions",
                             {"model": model_id, "messages": [{"role": "user", "content": "hi"}]})
    assert code == 200, body
    return body  # type: ignore[no-any-return]


def test_vllm_preset_waits_for_a_late_port_and_stops_the_workers(start_swapd, tmp_path):
    rec, dump = tmp_path / "rec.jsonl", tmp_path / "env.json"
    entry = model(fake_cmd("--boot-delay", "1.0", "--spawn-grandchild", "--env-dump", str(dump),
                           record=rec, name="vllm"), engine="vllm")
    daemon = start_swapd({"models": {"nemotron": entry}},
                         env={"VLLM_PORT": "tcp://10.0.0.9:8000"})
    t0 = time.monotonic()
    assert chat(daemon, "nemotron")["x_served_by"] == "vllm"
    assert time.monotonic() - t0 >= 1.0  # it waited for the port, it did not fail on it
    env = json.loads(dump.read_text())
    assert env["PYTHONUNBUFFERED"] == "1" and "VLLM_PORT" not in env
    stop_and_check_group_gone(daemon, "nemotron", rec)


@pytest.mark.parametrize("kind", ["llama.cpp", "sglang"])
def test_503_while_loading_is_not_ready(start_swapd, tmp_path, kind):
    rec, dump = tmp_path / "rec.jsonl", tmp_path / "env.json"
    entry = model(fake_cmd("--health-503-for", "1.0", "--spawn-grandchild", "--env-dump",
                           str(dump), record=rec, name=kind), engine=kind)
    daemon = start_swapd({"models": {"m": entry}},
                         env={"LLAMA_ARG_MODEL": "/nonexistent.gguf"})
    assert chat(daemon, "m")["x_served_by"] == kind
    env = json.loads(dump.read_text())
    if kind == "llama.cpp":
        assert "LLAMA_ARG_MODEL" not in env
    else:
        assert env["PYTHONUNBUFFERED"] == "1"
    lines = engine_log(daemon)
    # The request reached the engine only after its /health turned 200.
    assert index_of(lines, "model loaded, server ready") < index_of(
        lines, "request POST /v1/chat/completions")
    records = read_records(rec)
    ready = next(r["t"] for r in records if r["event"] == "ready")
    start = next(r["t"] for r in records if r["event"] == "start")
    assert ready - start >= 1.0
    stop_and_check_group_gone(daemon, "m", rec)


def test_trtllm_preset_health_and_mpi_workers(start_swapd, tmp_path):
    rec = tmp_path / "rec.jsonl"
    # trtllm-serve takes a moment to shut its MPI session down after SIGTERM.
    entry = model(fake_cmd("--spawn-grandchild", "--exit-on-sigterm-delay", "0.5",
                           record=rec, name="trtllm"), engine="trtllm")
    daemon = start_swapd({"models": {"gpt-oss-20b": entry}})
    assert chat(daemon, "gpt-oss-20b")["x_served_by"] == "trtllm"
    status = daemon.status()["models"]["gpt-oss-20b"]
    assert status["state"] == "ready"
    stop_and_check_group_gone(daemon, "gpt-oss-20b", rec)
    assert next(r for r in read_records(rec) if r["event"] == "exit")


def test_ollama_preset_lazy_load_and_unload_before_sigterm(start_swapd, tmp_path):
    rec, dump = tmp_path / "rec.jsonl", tmp_path / "env.json"
    # /health would stay 503 for a minute: the preset must not wait on it (Ollama has
    # none); GET / answers at once, and the model loads on the first request.
    entry = model(fake_cmd("--health-503-for", "60", "--lazy-load", "1.0",
                           "--env-dump", str(dump), record=rec, name="ollama"),
                  engine="ollama", useModelName="gpt-oss:20b",
                  env=["OLLAMA_HOST=127.0.0.1:${PORT}"])
    daemon = start_swapd({"models": {"oss": entry}},
                         env={"OLLAMA_HOST": "10.0.0.9:11434", "OLLAMA_KEEP_ALIVE": "5m"})
    code, loaded = daemon.post("/models/oss/load")
    assert code == 200 and loaded["seconds"] < 10, loaded
    env = json.loads(dump.read_text())
    upstream = daemon.status()["models"]["oss"]["upstream"]
    assert env["OLLAMA_MAX_LOADED_MODELS"] == "1" and env["OLLAMA_KEEP_ALIVE"] == "-1"
    assert env["OLLAMA_HOST"] == upstream.removeprefix("http://")  # the recipe's, not swapd's

    t0 = time.monotonic()
    first = chat(daemon, "oss")
    assert time.monotonic() - t0 >= 1.0  # the first request paid the load
    assert first["x_request"]["model"] == "gpt-oss:20b"
    chat(daemon, "oss")
    # The load happened once: the second request was served by the loaded model.
    loads = [line for line in engine_log(daemon) if "on first request" in line]
    assert len(loads) == 1, loads

    pid = next(r["pid"] for r in read_records(rec) if r["event"] == "start")
    code, body = daemon.post("/models/oss/unload")
    assert code == 200 and body["unloaded"] == ["oss"]
    wait_until(lambda: not pid_alive(pid), 10, "ollama gone")
    lines = engine_log(daemon)
    asked = index_of(lines, "request POST /api/generate")
    assert asked < index_of(lines, "received SIGTERM")  # unload first, then the signal
    [sent] = [line for line in lines if "engine unload request" in line and "[swapd]" in line]
    assert "status=200" in sent
    # The fake echoes the body it received: the model and keep_alive 0.
    assert re.search(r"keep_alive\W+0\b", sent) and "gpt-oss:20b" in sent, sent


async def test_unload_request_is_bounded_and_best_effort(tmp_path, monkeypatch):
    """A wedged engine that never answers the unload request is still stopped, once the
    request's own short timeout has passed; an engine that never became ready gets none."""
    monkeypatch.setattr(engine_mod, "UNLOAD_REQUEST_TIMEOUT", 0.5)
    port = free_port()
    rec = tmp_path / "rec.jsonl"
    cfg = ModelConfig(
        id="wedged",
        cmd=(sys.executable, str(FAKE_ENGINE), "--port", str(port), "--record", str(rec)),
        proxy=f"http://127.0.0.1:{port}",
        engine=EngineKind.OLLAMA,
        check_endpoint="/",
        unload_request=("/slow?seconds=30", "{}"),  # the fake's /slow hangs: a wedged server
    )
    engine = engine_mod.Engine(cfg)
    await engine.start()
    t0 = time.monotonic()
    assert await engine.stop() is False  # SIGTERM was enough
    assert 0.5 <= time.monotonic() - t0 < 5
    assert engine.state == engine_mod.EngineState.STOPPED
    # Never ready (it exits at once): no unload request, no wait.
    crashing = dataclasses.replace(cfg, cmd=(*cfg.cmd, "--crash-after", "0"))
    engine = engine_mod.Engine(crashing)
    with pytest.raises(engine_mod.StartError):
        await engine.start()
    assert engine.ready_at is None


# -- the precedence rules, as a pure function ------------------------------------------------


FILE = FileWide(health_check_timeout=120.0, unload_timeout=10.0)


def test_settle_the_recipe_wins_then_the_preset_then_the_file() -> None:
    vllm = PRESETS[EngineKind.VLLM]
    # Left out: the preset's.
    s = settle(EngineKind.VLLM, Recipe(model_name="m"), FILE)
    assert (s.check_endpoint, s.health_check_timeout, s.unload_timeout) == (
        vllm.check_endpoint, vllm.health_check_timeout, vllm.unload_timeout)
    assert s.env == vllm.env and s.env_remove == vllm.env_remove
    # Written on the recipe: the recipe's, also an env variable the preset sets.
    s = settle(EngineKind.VLLM, Recipe(
        check_endpoint="/v1/models", health_check_timeout=5, unload_timeout=3,
        env={"PYTHONUNBUFFERED": "0", "X": "1"}), FILE)
    assert (s.check_endpoint, s.health_check_timeout, s.unload_timeout) == ("/v1/models", 5, 3)
    assert dict(s.env) == {"PYTHONUNBUFFERED": "0", "X": "1"}
    # No engine: the file's, and llama-swap's /health.
    s = settle(None, Recipe(), FILE)
    assert (s.check_endpoint, s.health_check_timeout, s.unload_timeout) == ("/health", 120, 10)
    assert s.env == () and s.env_remove == () and s.unload_request is None


def test_settle_unload_timeout_zero_means_the_files_and_cmd_stop_skips_the_unload_request(
) -> None:
    s = settle(EngineKind.OLLAMA, Recipe(unload_timeout=0, model_name="qwen"), FILE)
    assert s.unload_timeout == FILE.unload_timeout
    assert s.unload_request == PRESETS[EngineKind.OLLAMA].unload_request("qwen")
    s = settle(EngineKind.OLLAMA, Recipe(has_cmd_stop=True, model_name="qwen"), FILE)
    assert s.unload_request is None
    # An engine whose readiness is the open port: "none", read by the loader.
    assert settle(EngineKind.OLLAMA, Recipe(), FILE).check_endpoint == "/"


@pytest.mark.parametrize("name", ["vllm", " VLLM ", "llama-server", "llamacpp", "tensorrt-llm"])
def test_engine_names_people_write(name: str) -> None:
    assert engine_kind(name) is not None
    assert engine_kind("tgi") is None
