"""Every shipped config passes `swapd check` (the real CLI, as a user runs it), names its engine,
and sizes its start-up for a Spark cold start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from swapd.config.loader import load_config
from swapd.config.sizes import GiB
from swapd.config.types import RouterKind

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CONFIGS = [ROOT / "config.example.yaml", *EXAMPLES]


def swapd_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "swapd", "check", "--config", str(path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )


def test_the_stacks_are_all_there() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"trtllm-gpt-oss-120b", "trtllm-gpt-oss-20b", "trtllm-brain-and-sprinter",
            "vllm-nemotron-3-nano", "llamacpp-gpt-oss-120b", "sglang-qwen3",
            "ollama-lane", "vllm-brain-and-sprinter-memory"} <= names


def test_brain_and_sprinter_are_placed_by_memory_without_groups() -> None:
    config = load_config(ROOT / "examples" / "vllm-brain-and-sprinter-memory.yaml").config
    assert config.router == RouterKind.MEMORY and config.groups == ()
    assert config.memory_reserve == 8 * GiB and config.memory_guard.enabled
    assert config.models["gpt-oss-120b"].memory == 70 * GiB
    assert config.models["gpt-oss-20b"].memory == 16 * GiB
    assert config.models["qwen3-coder-30b"].memory is None  # learned on its first run


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_swapd_check_passes(path: Path) -> None:
    done = swapd_check(path)
    assert done.returncode == 0, done.stderr
    # Shipped configs are clean. (An engine that is not installed on this machine, such as
    # /opt/vllm/bin/vllm, is a warning about the machine, not about the config.)
    found = [line for line in done.stdout.splitlines()
             if line.startswith("warning:") and not line.endswith("the engine cannot start")]
    assert found == [], done.stdout
    assert f"config: {path}" in done.stdout and "(preset defaults)" in done.stdout


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_name_an_engine_and_wait_minutes(path: Path) -> None:
    config = load_config(path).config
    assert config.models
    for m in config.models.values():
        assert m.engine is not None, m.id
        assert m.health_check_timeout >= 300, m.id  # a Spark cold start takes minutes
        assert m.unload_timeout >= 10, m.id
        assert "${" not in " ".join(m.cmd), m.id
    # A request may wait as long as the slowest start.
    assert config.queue_timeout > max(m.health_check_timeout for m in config.models.values())


def test_trtllm_options_files_exist_and_parse() -> None:
    for path in EXAMPLES:
        for m in load_config(path).config.models.values():
            if "--extra_llm_api_options" not in m.cmd:
                continue
            options = Path(m.cmd[m.cmd.index("--extra_llm_api_options") + 1])
            shipped = ROOT / "examples" / "trtllm" / options.name
            data = yaml.safe_load(shipped.read_text())
            kv = data["kv_cache_config"]
            assert 0 < kv["free_gpu_memory_fraction"] <= 0.9
            if len(load_config(path).config.models) > 1:  # co-resident: capped in tokens
                assert kv["max_tokens"] > 0


def test_brain_and_sprinter_are_one_co_resident_group() -> None:
    config = load_config(ROOT / "examples" / "trtllm-brain-and-sprinter.yaml").config
    [group] = config.groups
    assert set(group.members) == {"gpt-oss-120b", "gpt-oss-20b"} and not group.swap
    assert set(config.preload) == set(group.members)
