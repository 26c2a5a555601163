"""Matrix programs whose identifiers are the model names themselves."""

from __future__ import annotations

from swapd.placement.matrix import Program, compile_sets


def identity(*sets: tuple[str, str], costs: dict[str, int] | None = None) -> Program:
    return compile_sets(list(sets), lambda ident: ident, costs)
