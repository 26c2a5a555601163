"""Warm-swap keys (issue 20): llmsnap's `sleepMode`, `sleepEndpoints`, `wakeEndpoints` load
unchanged; swapd's `sleepMinFreed`, `sleepTimeout`, `sleepTtl`; presets supply vLLM's
level 2 and SGLang's release/resume; bad values name their key path (exit 2)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from swapd.config.loader import load_config
from swapd.config.nodes import ConfigError
from swapd.config.presets import SGLANG_SLEEP, SGLANG_WAKE, VLLM_SLEEP, VLLM_WAKE, Call
from swapd.config.types import LoadResult

LLMSNAP = """
models:
  phi:
    cmd: vllm serve ./phi-4 --port ${PORT} --enable-sleep-mode
    env:
      - VLLM_SERVER_DEV_MODE=1
    sleepMode: enable
    sleepEndpoints:
      - endpoint: /sleep
        method: POST
        body: '{"level": 2}'
    wakeEndpoints:
      - endpoint: /wake_up
        method: POST
        timeout: 30
      - endpoint: /collective_rpc
        method: POST
        body: '{"method": "reload_weights"}'
        timeout: 180
      - endpoint: /reset_prefix_cache
        method: POST
"""


def load(tmp_path: Path, text: str) -> LoadResult:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(path, environ={})


def error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value


def test_an_llmsnap_config_loads_unchanged(tmp_path: Path) -> None:
    result = load(tmp_path, LLMSNAP)
    sleep = result.config.models["phi"].sleep
    assert sleep is not None and result.warnings == ()
    assert sleep.sleep == (Call("/sleep", "POST", '{"level": 2}'),)
    assert [c.path for c in sleep.wake] == ["/wake_up", "/collective_rpc", "/reset_prefix_cache"]
    assert [c.timeout for c in sleep.wake] == [30.0, 180.0, 0.0]
    assert (sleep.timeout, sleep.ttl, sleep.min_freed, sleep.min_freed_percent) == (
        30.0, 0.0, None, 50.0)


def test_presets_supply_level_2_and_sglang_release(tmp_path: Path) -> None:
    result = load(tmp_path, """
        models:
          v: {cmd: "vllm serve m --port ${PORT}", engine: vllm, sleepMode: enable,
              sleepMinFreed: 40GiB, sleepTimeout: 60, sleepTtl: 3600}
          s: {cmd: "python -m sglang.launch_server --port ${PORT}", engine: sglang,
              sleepMode: enable, sleepMinFreed: "70%"}
          plain: {cmd: "vllm serve m --port ${PORT}", engine: vllm}
          l: {cmd: "llama-server --port ${PORT}", engine: llama.cpp, sleepMode: enable}
          t: {cmd: "trtllm-serve m --port ${PORT}", engine: trtllm, sleepMode: enable}
        """)
    models = result.config.models
    v, s = models["v"].sleep, models["s"].sleep
    assert v is not None and v.sleep == VLLM_SLEEP and v.wake == VLLM_WAKE
    assert VLLM_SLEEP[0].path == "/sleep?level=2"
    assert [(c.path, c.body) for c in VLLM_WAKE] == [
        ("/wake_up", None), ("/collective_rpc", '{"method": "reload_weights"}'),
        ("/reset_prefix_cache", None)]
    assert (v.min_freed, v.timeout, v.ttl) == (40 * 1024**3, 60.0, 3600.0)
    assert s is not None and (s.sleep, s.wake) == (SGLANG_SLEEP, SGLANG_WAKE)
    assert s.min_freed is None and s.min_freed_percent == 70.0
    assert s.min_freed_of(100) == 70
    assert models["plain"].sleep is None  # default: disable
    assert models["l"].sleep is None and models["t"].sleep is None
    assert any(w.startswith("models.l.sleepMode:") for w in result.warnings)
    assert any(w.startswith("models.t.sleepMode:") for w in result.warnings)


@pytest.mark.parametrize(("entry", "path", "words"), [
    ("sleepMode: maybe", "models.m.sleepMode", "enable or disable"),
    ("sleepMode: enable\n    sleepEndpoints: [{endpoint: /sleep}]", "models.m.wakeEndpoints",
     "required"),
    ("sleepMode: enable\n    sleepEndpoints: /sleep\n    wakeEndpoints: [{endpoint: /w}]",
     "models.m.sleepEndpoints", "must be a list"),
    ("sleepMode: enable\n    sleepEndpoints: [{endpoint: 'http://evil/x'}]\n"
     "    wakeEndpoints: [{endpoint: /w}]", "models.m.sleepEndpoints[0].endpoint",
     "engine's own address"),
    ("sleepMode: enable\n    sleepEndpoints: [{endpoint: /s, method: DELETE}]\n"
     "    wakeEndpoints: [{endpoint: /w}]", "models.m.sleepEndpoints[0].method", "one of"),
    ("sleepMode: enable\n    sleepEndpoints: [{endpoint: /s}]\n"
     "    wakeEndpoints: [{endpoint: /w, timeout: -1}]", "models.m.wakeEndpoints[0].timeout",
     "≥ 0"),
    ("sleepMinFreed: lots", "models.m.sleepMinFreed", "size"),
    ("sleepMinFreed: '150%'", "models.m.sleepMinFreed", "at most 100"),
    ("sleepTimeout: 0", "models.m.sleepTimeout", "> 0"),
    ("sleepTtl: -5", "models.m.sleepTtl", "≥ 0"),
])
def test_bad_values_name_their_key_path(tmp_path: Path, entry: str, path: str,
                                        words: str) -> None:
    exc = error(tmp_path, f"""
models:
  m:
    cmd: vllm serve m --port ${{PORT}}
    engine: vllm
    {entry}
""")
    assert exc.key_path == path, str(exc)
    assert words in str(exc)


def test_swapd_check_exits_2_on_a_bad_sleep_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  m:\n    cmd: x --port ${PORT}\n    sleepMode: sometimes\n")
    proc = subprocess.run([sys.executable, "-m", "swapd", "check", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "models.m.sleepMode" in proc.stderr + proc.stdout


def test_swapd_check_shows_the_sleep_and_wake_calls(tmp_path: Path) -> None:
    from swapd.cli import format_check

    text = format_check(load(tmp_path, LLMSNAP))
    assert "sleep:    POST /sleep instead of a stop" in text
    assert "wake:     POST /wake_up, POST /collective_rpc, POST /reset_prefix_cache" in text
