"""Learned engine footprints: what each model's engine was measured needing, kept in stateDir.

A model without `memory:` in its recipe is measured while it runs and the figure is used the
next time it is placed (swapd/memrouter.py). What is measured (docs/memory.md):
- the peak, over the engine's life, of its whole process tree's RSS plus the GPU memory NVML
  attributes to those processes (where NVML reports it);
- where GPU memory is the host's (GB10, `memory_source="meminfo"`), also the drop in
  MemAvailable from spawn to readiness, when no other engine started or stopped meanwhile:
  CUDA allocations there need not show up in any process's RSS.
The footprint is the larger of the two.

A figure belongs to one recipe: it is stored with a fingerprint of the command and the
environment, and a changed recipe (another model, `--gpu-memory-utilization`, context size)
starts learning afresh. An engine the memory guard killed needed more than it reached; its
figure grows by a quarter each time, so placement stops starting it where it cannot fit.

The file is JSON, written atomically (a reader sees the old file or the new, never a part).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from swapd.config.types import ModelConfig
from swapd.files import read_state_json, write_atomic

log = structlog.get_logger("swapd.footprints")

FILE_NAME: Final = "footprints.json"
# After a guard kill the engine needed at least this much more than it reached.
GUARD_KILL_GROWTH: Final = 1.25


def fingerprint(cfg: ModelConfig) -> str:
    """What decides an engine's memory: its argv and environment (not ttl, aliases, ...).

    The port is left out: ${PORT} numbering moves when models are added before this one, and
    that changes nothing about the memory the engine takes.
    """
    port = str(cfg.port) if cfg.port is not None else None

    def general(text: str) -> str:
        if port is None:
            return text
        if text == port:
            return "${PORT}"
        for sep in (":", "="):
            if text.endswith(sep + port):
                return text[: -len(port)] + "${PORT}"
        return text

    doc = json.dumps({"cmd": [general(a) for a in cfg.cmd],
                      "env": sorted((k, general(v)) for k, v in cfg.env)}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Run:
    """What one engine run showed."""

    peak: int  # peak of process-tree RSS + NVML GPU memory
    drop: int | None = None  # MemAvailable drop spawn → ready (unified memory only)
    ready: bool = False  # it became ready (a complete load)
    guard_killed: bool = False


def learn(previous: int | None, run: Run) -> int | None:
    """The footprint to keep after `run`, given the one kept before (None: none yet).

    A complete run replaces the figure: the engine may have become smaller (a smaller
    context). A run cut short (crash or stop while loading) only raises it: it got that far,
    it did not finish. A guard kill says it needed more than it reached.
    """
    measured = max(run.peak, run.drop or 0)
    if measured <= 0:
        return previous
    if run.guard_killed:
        measured = int(measured * GUARD_KILL_GROWTH)
        return measured if previous is None else max(previous, measured)
    if run.ready:
        return measured
    return measured if previous is None else max(previous, measured)


@dataclass(frozen=True)
class Footprint:
    bytes: int
    fingerprint: str
    updated: float  # wall clock


class FootprintStore:
    """model id → learned footprint, persisted as `stateDir/footprints.json`.

    Lives on the event loop; a write is small (one JSON line per model) and atomic.
    """

    def __init__(self, state_dir: Path | None) -> None:
        self._path = state_dir / FILE_NAME if state_dir is not None else None
        self._entries: dict[str, Footprint] = {}
        self._lock = threading.Lock()
        self._queued = 0  # saves asked for
        self._written = 0  # the latest save on disk
        self._load()

    @property
    def path(self) -> Path | None:
        return self._path

    def get(self, cfg: ModelConfig) -> int | None:
        """The learned footprint of this recipe, None when it was never measured."""
        entry = self._entries.get(cfg.id)
        if entry is None or entry.fingerprint != fingerprint(cfg):
            return None
        return entry.bytes

    def record(self, cfg: ModelConfig, run: Run) -> int | None:
        """Fold one run into the model's figure and save it; returns the figure now kept."""
        before = self.get(cfg)
        after = learn(before, run)
        if after is None or after == before:
            return before
        self._entries[cfg.id] = Footprint(after, fingerprint(cfg), time.time())
        log.info("engine footprint learned", model=cfg.id, bytes=after, previous=before,
                 peak=run.peak, drop=run.drop, complete=run.ready,
                 guard_killed=run.guard_killed)
        self._save()
        return after

    def entries(self) -> Mapping[str, Footprint]:
        return dict(self._entries)

    def _load(self) -> None:
        if self._path is None:
            return
        try:
            doc: Any = read_state_json(self._path)
        except (OSError, ValueError) as exc:
            # Learned figures are a cache: a bad file costs some re-learning, not a start.
            log.warning("cannot read learned footprints; learning afresh",
                        path=str(self._path), error=str(exc))
            return
        models = doc.get("models") if isinstance(doc, dict) else None
        for model, entry in (models or {}).items():
            try:
                size = int(entry["bytes"])
                fp = str(entry["fingerprint"])
                updated = float(entry.get("updated", 0.0))
            except (KeyError, TypeError, ValueError, OverflowError):
                continue
            if not math.isfinite(updated):
                continue
            if size > 0:
                self._entries[str(model)] = Footprint(size, fp, updated)

    def _save(self) -> None:
        """Write the figures: in a worker thread when on the event loop (an fsync must not
        stall requests), in order (a stale write never overwrites a newer one)."""
        if self._path is None:
            return
        doc = {
            "version": 1,
            "models": {
                model: {"bytes": e.bytes, "fingerprint": e.fingerprint, "updated": e.updated}
                for model, e in sorted(self._entries.items())
            },
        }
        data = (json.dumps(doc, indent=1) + "\n").encode()
        self._queued += 1
        seq = self._queued
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write(seq, data)
            return
        loop.run_in_executor(None, self._write, seq, data)

    def _write(self, seq: int, data: bytes) -> None:
        assert self._path is not None
        with self._lock:
            if seq <= self._written:
                return
            try:
                write_atomic(self._path, data)
            except OSError as exc:
                log.warning("cannot save learned footprints", path=str(self._path),
                            error=str(exc))
            self._written = seq


@dataclass
class _Running:
    spawned_available: int | None
    epoch: int
    peak: int = 0
    drop: int | None = None
    ready: bool = False


class Learner:
    """Follows each engine run (spawn → samples → ready → end) and feeds the store.

    `unified`: GPU memory is the host's (GB10), so the MemAvailable drop is measured too.
    Another engine spawning or ending between a spawn and its readiness spoils that drop, so
    each lifecycle event advances an epoch and a drop counts only within one.
    """

    def __init__(self, store: FootprintStore) -> None:
        self.store = store
        self.unified = False
        self._runs: dict[str, _Running] = {}
        self._epoch = 0

    def spawned(self, model: str, available: int | None) -> None:
        self._epoch += 1
        self._runs[model] = _Running(spawned_available=available, epoch=self._epoch)

    def observed(self, model: str, used: int) -> None:
        run = self._runs.get(model)
        if run is not None and used > run.peak:
            run.peak = used

    def running(self, model: str) -> bool:
        return model in self._runs

    def peak(self, model: str) -> int | None:
        run = self._runs.get(model)
        return run.peak if run is not None else None

    def measured(self, model: str) -> int | None:
        """What the running engine was measured needing so far (its peak, and on unified
        memory the MemAvailable drop to readiness): a footprint before one is learned."""
        run = self._runs.get(model)
        if run is None:
            return None
        value = max(run.peak, run.drop or 0)
        return value or None

    def became_ready(self, model: str, available: int | None) -> None:
        run = self._runs.get(model)
        if run is None:
            return
        run.ready = True
        if (self.unified and run.epoch == self._epoch and available is not None
                and run.spawned_available is not None):
            run.drop = max(0, run.spawned_available - available)

    def ended(self, cfg: ModelConfig, *, guard_killed: bool = False,
              learn: bool = True) -> int | None:
        """The run is over (stopped, crashed or killed): learn from it (unless `learn` is
        False: a configured `memory:` is not replaced by a measurement)."""
        run = self._runs.pop(cfg.id, None)
        self._epoch += 1
        if run is None or not learn:
            return None
        return self.store.record(
            cfg, Run(peak=run.peak, drop=run.drop, ready=run.ready, guard_killed=guard_killed)
        )
