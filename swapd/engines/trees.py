"""The process trees of the engines that run now, for readers on other threads.

Engines add their tree when spawned and remove it when reaped (`engine.GroupRecord`); the
record under `stateDir` (swapd/engines/orphans.py), when given, is kept in step. Readers (the
GPU sampler's thread, the memory guard) get an immutable `model -> Tree` snapshot that is
replaced, never mutated: no lock, no retry. The daemon builds it first, so the sampler that
reads it exists before the memory watch and the scheduler that need the sampler.
"""

from __future__ import annotations

import types
from collections.abc import Mapping

from swapd.engines import procgroup
from swapd.engines.engine import GroupRecord


class EngineTrees:
    def __init__(self, record: GroupRecord | None = None) -> None:
        self._record = record
        self._trees: dict[str, procgroup.Tree] = {}
        self._snapshot: Mapping[str, procgroup.Tree] = types.MappingProxyType({})

    def add(self, model: str, tree: procgroup.Tree) -> None:
        if self._record is not None:
            self._record.add(model, tree)
        self._trees[model] = tree
        self._snapshot = types.MappingProxyType(dict(self._trees))

    def remove(self, pid: int) -> None:
        if self._record is not None:
            self._record.remove(pid)
        self._trees = {m: t for m, t in self._trees.items() if t.leader != pid}
        self._snapshot = types.MappingProxyType(dict(self._trees))

    def snapshot(self) -> Mapping[str, procgroup.Tree]:
        """Every engine's tree now (immutable; safe to read from any thread)."""
        return self._snapshot
