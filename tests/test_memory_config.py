"""Config keys of the memory router and guard: `memory:`, `routing.router.use: memory`,
`settings.memory.reserve`, `memoryGuard`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from swapd.cli import format_check
from swapd.config.loader import load_config
from swapd.config.nodes import ConfigError
from swapd.config.sizes import Floor, GiB, MiB
from swapd.config.types import RouterKind


def load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(path, environ={"RESERVE": "6GiB"})


BRAIN_AND_SPRINTER = """
    routing:
      router:
        use: memory
        settings:
          memory:
            reserve: ${env.RESERVE}
    memoryGuard:
      floor: 3%
    models:
      brain:
        cmd: vllm serve openai/gpt-oss-120b --port ${PORT}
        memory: 70GiB
      sprinter:
        cmd: vllm serve openai/gpt-oss-20b --port ${PORT}
        memory: 16G
      helper:
        cmd: llama-server --port ${PORT}
"""


def test_memory_router_keys(tmp_path: Path) -> None:
    result = load(tmp_path, BRAIN_AND_SPRINTER)
    config = result.config
    assert result.warnings == ()
    assert config.router == RouterKind.MEMORY
    assert config.memory_reserve == 6 * GiB
    assert config.memory_guard.enabled and config.memory_guard.floor == Floor(percent=3.0)
    assert config.models["brain"].memory == 70 * GiB
    assert config.models["sprinter"].memory == 16 * GiB
    assert config.models["helper"].memory is None
    text = format_check(result)
    assert "router: memory (reserve 6.0GiB)" in text
    assert "memoryGuard: floor 3%" in text
    assert "memory:   70.0GiB" in text and "memory:   learned while it runs" in text


def test_defaults_keep_one_tenant_and_a_2gib_guard(tmp_path: Path) -> None:
    config = load(tmp_path, "models:\n  a:\n    cmd: engine --port ${PORT}\n").config
    assert config.router == RouterKind.GROUP
    assert config.memory_guard.enabled
    assert config.memory_guard.floor == Floor(bytes=2 * GiB)
    assert config.models["a"].memory is None


def test_guard_can_be_turned_off_and_floor_given_in_bytes(tmp_path: Path) -> None:
    config = load(tmp_path, """
        memoryGuard: {enabled: false, floor: 536870912}
        models:
          a: {cmd: engine}
    """).config
    assert not config.memory_guard.enabled
    assert config.memory_guard.floor == Floor(bytes=512 * MiB)


def test_changing_memory_does_not_restart_the_engine(tmp_path: Path) -> None:
    # Reload compares recipes by equality: a placement hint is not part of how it runs.
    a = load(tmp_path, "models:\n  a: {cmd: engine, memory: 1GiB}\n").config.models["a"]
    b = load(tmp_path, "models:\n  a: {cmd: engine, memory: 2GiB}\n").config.models["a"]
    assert a == b and a.memory != b.memory


@pytest.mark.parametrize(("text", "path", "words"), [
    ("models:\n  a: {cmd: engine, memory: lots}\n", "models.a.memory", "16GiB"),
    ("models:\n  a: {cmd: engine, memory: 0}\n", "models.a.memory", "more than 0"),
    ("models:\n  a: {cmd: engine, memory: 12 parsecs}\n", "models.a.memory", "unknown unit"),
    ("memoryGuard: {floor: 60%}\nmodels:\n  a: {cmd: engine}\n", "memoryGuard.floor", "below 50"),
    ("memoryGuard: {floor: x}\nmodels:\n  a: {cmd: engine}\n", "memoryGuard.floor", "percentage"),
    ("memoryGuard: {enabled: 3}\nmodels:\n  a: {cmd: engine}\n", "memoryGuard.enabled",
     "true or false"),
    ("routing: {router: {use: memory, settings: {memory: {reserve: -1}}}}\n"
     "models:\n  a: {cmd: engine}\n", "routing.router.settings.memory.reserve", "more than 0"),
    ("routing: {router: {use: magic}}\nmodels:\n  a: {cmd: engine}\n", "routing.router.use",
     "group, matrix or memory"),
])
def test_errors_name_the_key_path(tmp_path: Path, text: str, path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert info.value.key_path == path
    assert words in str(info.value)


def test_unknown_keys_under_memory_settings_warn(tmp_path: Path) -> None:
    result = load(tmp_path, """
        routing: {router: {use: memory, settings: {memory: {reserve: 1GiB, budget: 9GiB}}}}
        memoryGuard: {floor: 1GiB, redline: 3GiB}
        models:
          a: {cmd: engine}
    """)
    assert any("routing.router.settings.memory.budget" in w for w in result.warnings)
    assert any("memoryGuard.redline" in w for w in result.warnings)
