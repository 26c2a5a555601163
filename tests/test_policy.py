"""Pure policy: no processes, no clocks."""

from __future__ import annotations

from swapd.config.types import GroupConfig
from swapd.placement.groups import evictions
from swapd.schedule.rules import backoff, idle_at

GPU: dict[str, bool] = {}


def test_default_group_is_one_at_a_time():
    assert evictions("b", ["a"], (), GPU) == ["a"]
    assert evictions("a", ["a"], (), GPU) == []
    assert evictions("a", [], (), GPU) == []


def test_gpu_false_never_evicts_nor_is_evicted():
    gpu = {"helper": False}
    assert evictions("helper", ["a"], (), gpu) == []
    assert evictions("b", ["a", "helper"], (), gpu) == ["a"]


def test_swap_false_group_members_run_together():
    groups = (GroupConfig("pair", swap=False, exclusive=True, members=("a", "b")),)
    assert evictions("b", ["a"], groups, GPU) == []
    # An exclusive group unloads models outside it.
    assert evictions("a", ["x"], groups, GPU) == ["x"]
    # And a model outside it (default group, exclusive) unloads the pair.
    assert sorted(evictions("x", ["a", "b"], groups, GPU)) == ["a", "b"]


def test_non_exclusive_group_leaves_others_and_persistent_survives():
    groups = (
        GroupConfig("side", swap=True, exclusive=False, members=("s1", "s2")),
        GroupConfig("forever", swap=False, exclusive=False, persistent=True, members=("f",)),
    )
    assert evictions("s1", ["a", "f"], groups, GPU) == []
    assert evictions("s2", ["s1"], groups, GPU) == ["s1"]
    assert evictions("a", ["s1", "f"], groups, GPU) == ["s1"]


def test_idle_needs_ttl_no_inflight_and_elapsed_time():
    def at(ttl=10.0, inflight=0, last=0.0, ready=True):
        return idle_at(ttl, inflight, last, ready)

    assert at() == 10.0  # idle from 10 s on: at now=100 it is idle
    assert at(last=95.0) == 105.0  # fresh: idle in 5 s
    assert at(inflight=1) is None  # busy
    assert at(ttl=0) is None  # never
    assert at(ready=False) is None  # cold


def test_backoff_doubles_to_a_cap():
    assert [backoff(n, 1, 60) for n in range(0, 9)] == [0, 1, 2, 4, 8, 16, 32, 60, 60]

