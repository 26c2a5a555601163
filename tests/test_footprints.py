"""Learned footprints (swapd/footprints.py): the learning rule, the store, the learner."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from swapd.config.sizes import GiB
from swapd.config.types import ModelConfig
from swapd.memory.footprints import FILE_NAME, FootprintStore, Learner, Run, fingerprint, learn
from tests.support import wait_until_async

CFG = ModelConfig(id="brain", cmd=("vllm", "serve", "openai/gpt-oss-120b"))


@pytest.mark.parametrize(("previous", "run", "kept"), [
    (None, Run(peak=70 * GiB, ready=True), 70 * GiB),
    (70 * GiB, Run(peak=60 * GiB, ready=True), 60 * GiB),  # a complete run replaces
    (70 * GiB, Run(peak=20 * GiB, ready=False), 70 * GiB),  # cut short: only raises
    (None, Run(peak=20 * GiB, ready=False), 20 * GiB),
    (10 * GiB, Run(peak=20 * GiB, ready=False), 20 * GiB),
    (None, Run(peak=10 * GiB, drop=68 * GiB, ready=True), 68 * GiB),  # GB10: the drop wins
    (None, Run(peak=40 * GiB, guard_killed=True), 50 * GiB),  # killed: needed more
    (60 * GiB, Run(peak=40 * GiB, guard_killed=True), 60 * GiB),
    (30 * GiB, Run(peak=0), 30 * GiB),  # nothing measured: nothing learned
    (None, Run(peak=0), None),
])
def test_learn(previous: int | None, run: Run, kept: int | None) -> None:
    assert learn(previous, run) == kept


def test_store_persists_atomically_and_reloads(tmp_path: Path) -> None:
    store = FootprintStore(tmp_path)
    assert store.get(CFG) is None
    assert store.record(CFG, Run(peak=70 * GiB, ready=True)) == 70 * GiB
    doc = json.loads((tmp_path / FILE_NAME).read_text())
    assert doc["models"]["brain"]["bytes"] == 70 * GiB
    assert [p.name for p in tmp_path.iterdir()] == [FILE_NAME]  # no temp file left behind
    again = FootprintStore(tmp_path)
    assert again.get(CFG) == 70 * GiB


def test_a_changed_recipe_learns_afresh(tmp_path: Path) -> None:
    store = FootprintStore(tmp_path)
    store.record(CFG, Run(peak=70 * GiB, ready=True))
    bigger = dataclasses.replace(CFG, cmd=(*CFG.cmd, "--max-model-len", "131072"))
    assert fingerprint(bigger) != fingerprint(CFG)
    assert store.get(bigger) is None
    # ttl, aliases and the configured memory do not change how much the engine takes.
    same = dataclasses.replace(CFG, ttl=300.0, aliases=("gpt",), memory=1)
    assert store.get(same) == 70 * GiB


def test_the_port_is_not_part_of_the_recipe(tmp_path: Path) -> None:
    a = ModelConfig(id="m", cmd=("engine", "--port", "5800"), proxy="http://127.0.0.1:5800",
                    env=(("OLLAMA_HOST", "127.0.0.1:5800"),))
    b = ModelConfig(id="m", cmd=("engine", "--port", "5803"), proxy="http://127.0.0.1:5803",
                    env=(("OLLAMA_HOST", "127.0.0.1:5803"),))
    c = ModelConfig(id="m", cmd=("engine", "--port", "5803", "--ctx", "5803"),
                    proxy="http://127.0.0.1:5803")
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(b) != fingerprint(c)


def test_a_broken_file_costs_relearning_not_a_start(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_text("{not json")
    store = FootprintStore(tmp_path)
    assert store.get(CFG) is None
    store.record(CFG, Run(peak=GiB, ready=True))
    assert FootprintStore(tmp_path).get(CFG) == GiB


def test_an_unwritable_state_dir_keeps_the_figure_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = FootprintStore(blocker / "sub")  # a folder under a file cannot exist
    assert store.record(CFG, Run(peak=GiB, ready=True)) == GiB
    assert store.get(CFG) == GiB


def test_no_state_dir_learns_in_memory_only() -> None:
    store = FootprintStore(None)
    store.record(CFG, Run(peak=GiB, ready=True))
    assert store.get(CFG) == GiB and store.path is None


def test_learner_peak_and_drop_on_unified_memory() -> None:
    learner = Learner(FootprintStore(None))
    learner.unified = True
    learner.spawned("brain", available=110 * GiB)
    for used in (1 * GiB, 30 * GiB, 12 * GiB):
        learner.observed("brain", used)
    learner.became_ready("brain", available=40 * GiB)
    assert learner.ended(CFG) == 70 * GiB  # the 70 GiB drop beats the 30 GiB RSS peak


def test_learner_ignores_a_drop_spoiled_by_another_engine() -> None:
    learner = Learner(FootprintStore(None))
    learner.unified = True
    learner.spawned("brain", available=110 * GiB)
    learner.spawned("sprinter", available=109 * GiB)  # started meanwhile: its memory is in the drop
    learner.observed("brain", 30 * GiB)
    learner.became_ready("brain", available=24 * GiB)
    assert learner.ended(CFG) == 30 * GiB


def test_learner_without_unified_memory_uses_the_tree_peak() -> None:
    learner = Learner(FootprintStore(None))
    learner.spawned("brain", available=110 * GiB)
    learner.observed("brain", 5 * GiB)
    learner.became_ready("brain", available=40 * GiB)
    assert learner.ended(CFG) == 5 * GiB


def test_learner_guard_kill() -> None:
    learner = Learner(FootprintStore(None))
    learner.spawned("brain", available=110 * GiB)
    learner.observed("brain", 40 * GiB)
    assert learner.ended(CFG, guard_killed=True) == 50 * GiB


async def test_on_the_event_loop_the_write_goes_to_a_thread_and_the_last_one_wins(
    tmp_path: Path,
) -> None:
    store = FootprintStore(tmp_path)
    other = ModelConfig(id="sprinter", cmd=("vllm", "serve", "openai/gpt-oss-20b"))
    store.record(CFG, Run(peak=70 * GiB, ready=True))
    store.record(other, Run(peak=16 * GiB, ready=True))
    store.record(CFG, Run(peak=60 * GiB, ready=True))
    path = tmp_path / FILE_NAME
    await wait_until_async(
        lambda: path.exists()
        and json.loads(path.read_text())["models"]["brain"]["bytes"] == 60 * GiB,
        message="the last figure on disk")
    again = FootprintStore(tmp_path)
    assert again.get(CFG) == 60 * GiB and again.get(other) == 16 * GiB
