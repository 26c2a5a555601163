"""llama-swap's groups as a router: who is evicted for whom (the default router)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from swapd.config.types import GroupConfig
from swapd.placement.types import RouteAnswer, RouteQuery

# Models in no group behave as llama-swap's implicit default group: one at a time,
# and loading one unloads every other non-persistent group.
DEFAULT_GROUP = GroupConfig(name="(default)", swap=True, exclusive=True, persistent=False)


def group_of(model: str, groups: Iterable[GroupConfig]) -> GroupConfig:
    for group in groups:
        if model in group.members:
            return group
    return DEFAULT_GROUP


def evictions(
    target: str,
    running: Iterable[str],
    groups: Iterable[GroupConfig],
    gpu: Mapping[str, bool],
) -> list[str]:
    """The running models that must stop before `target` may start.

    llama-swap's group rules (its #109): within a group, `swap: true` allows one
    member at a time; across groups, an `exclusive` target unloads every other
    group that is not `persistent`. Models with `gpu: false` are no GPU tenant:
    they neither evict nor get evicted.
    """
    groups = tuple(groups)
    if not gpu.get(target, True):
        return []
    mine = group_of(target, groups)
    out: list[str] = []
    for other in running:
        if other == target or not gpu.get(other, True):
            continue
        theirs = group_of(other, groups)
        if theirs is mine or theirs.name == mine.name:
            if mine.swap:
                out.append(other)
        elif mine.exclusive and not theirs.persistent:
            out.append(other)
    return out



def groups_router(p: RouteQuery) -> RouteAnswer:
    """llama-swap's group rules (evictions): the default router."""
    running = [m for m, v in p.models.items() if v.running]
    gpu = {m: v.gpu for m, v in p.models.items()}
    return tuple(evictions(p.target, running, p.groups, gpu))


