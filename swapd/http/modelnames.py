"""What a request's `model` names: a profile pin first, then a selector, then a local id
or alias, then a peer model (llama-swap's order: profiles run before selectors, and local
names win over unqualified peer names).

Everything but the spillover counts is a pure function of the config and the engines'
states, which the caller passes in; handlers use the answer to take a lease or to relay
to a peer, and never touch a process.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from swapd.config.types import Config, ModelConfig, PeerConfig, SelectorConfig, Strategy

# Engine states (swapd.engine.EngineState values) as the selectors see them.
READY, STARTING, STOPPING, FAILED = "ready", "starting", "stopping", "failed"
WAKING, SLEEPING = "waking", "sleeping"  # warm swaps (docs/sleep.md)

StateOf = Callable[[str], str]  # model id → engine state ("stopped" when none)


class Unroutable(Exception):
    """A name that leads nowhere; carries the HTTP answer."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


@dataclass(frozen=True)
class Local:
    model: ModelConfig
    # The name after the profile and the selector: what filters.setParamsByID looks up.
    requested: str


@dataclass(frozen=True)
class Remote:
    peer: PeerConfig
    model: str  # the peer's own id for it
    requested: str

    @property
    def label(self) -> str:
        return f"{self.peer.id}/{self.model}"


@dataclass(frozen=True)
class Chosen:
    """A selector's pick. A spillover pick holds a reservation on `real` (model id or
    "<peer>/<model>") until `Spillover.release(chosen)` when the request ends."""

    selector: str
    target: str
    real: str
    reserved: bool


def pinned(config: Config, profile: str | None, name: str) -> str:
    """`name` after the active profile's pin; a disabled (`~`) pin answers 404."""
    found = config.profiles.get(profile) if profile else None
    if found is None:
        return name
    is_pin, target = found.pin(name)
    if not is_pin:
        return name
    if target is None:
        raise Unroutable(404, f"model {name!r} is turned off by profile {profile!r}",
                         "model_not_found")
    return target


def find(config: Config, name: str) -> Local | Remote:
    """A concrete name (no pins, no selectors) → where it is served."""
    model = config.resolve(name)
    if model is not None:
        return Local(model, name)
    route = config.peer_routes.get(name)
    if route is not None:
        return Remote(config.peers[route[0]], route[1], name)
    raise Unroutable(404, f"model {name!r} is not configured", "model_not_found")


def resolve(config: Config, profile: str | None, name: str,
            choose: Callable[[SelectorConfig], str] | None) -> tuple[Local | Remote,
                                                                     Chosen | None]:
    """Profile pin → selector (with `choose`; None refuses selectors: /upstream) → target."""
    name = pinned(config, profile, name)
    selector = config.selectors.get(name)
    chosen = None
    if selector is not None:
        if choose is None:
            raise Unroutable(400, f"{name!r} is a selector; selectors cannot be used on "
                             "/upstream: name one of its targets", "selector_not_allowed")
        target = choose(selector)
        chosen = Chosen(name, target, _real(config, target)[0],
                        selector.strategy == Strategy.SPILLOVER)
        name = target
    return find(config, name), chosen


# -- selectors -------------------------------------------------------------------------


def _real(config: Config, target: str) -> tuple[str, bool]:
    """(the model id or "<peer>/<model>", is it local)."""
    model = config.resolve(target)
    if model is not None:
        return model.id, True
    peer, peer_model = config.peer_routes[target]
    return f"{peer}/{peer_model}", False


def warm(config: Config, selector: SelectorConfig, state: StateOf) -> str:
    """The first ready target in order, else the first starting (or waking) one, else the
    first sleeping one (a wake costs seconds where a cold start costs minutes), else the
    first."""
    for wanted in ((READY,), (STARTING, WAKING), (SLEEPING,)):
        for target in selector.targets:
            if state(_real(config, target)[0]) in wanted:
                return target
    return selector.targets[0]


class Spillover:
    """Requests in flight per spillover target, counted from the selector's pick until
    the request ends (llama-swap's reservation counts). Owned by the proxy."""

    def __init__(self) -> None:
        self._inflight: dict[tuple[str, str], int] = {}
        self._turn = itertools.count()

    def inflight(self, selector: str, real: str) -> int:
        return self._inflight.get((selector, real), 0)

    def choose(self, config: Config, selector: SelectorConfig, state: StateOf) -> str:
        """Fill active targets up to `spillover` requests each, least busy first; start
        the next cold target in order once every active one is full."""
        active: list[tuple[str, str]] = []
        cold: list[tuple[str, str]] = []
        for target in selector.targets:
            real, local = _real(config, target)
            busy = self.inflight(selector.id, real) > 0
            now = state(real) if local else ""
            if now in (STOPPING, FAILED):
                continue  # on its way down or in crash backoff: not a place to send more
            if now in (READY, STARTING) or busy:
                active.append((target, real))
            else:
                cold.append((target, real))
        if not active and not cold:
            raise Unroutable(503, f"selector {selector.id!r} has no available target",
                             "no_target")
        if not active:
            return self._reserve(selector.id, *cold[0])
        least = min(self.inflight(selector.id, real) for _, real in active)
        if least >= selector.spillover and cold:
            return self._reserve(selector.id, *cold[0])
        tied = [t for t in active if self.inflight(selector.id, t[1]) == least]
        return self._reserve(selector.id, *tied[next(self._turn) % len(tied)])

    def _reserve(self, selector: str, target: str, real: str) -> str:
        self._inflight[(selector, real)] = self.inflight(selector, real) + 1
        return target

    def release(self, chosen: Chosen) -> None:
        if not chosen.reserved:
            return
        key = (chosen.selector, chosen.real)
        left = self._inflight.get(key, 0) - 1
        if left > 0:
            self._inflight[key] = left
        else:
            self._inflight.pop(key, None)


def choose(config: Config, selector: SelectorConfig, state: StateOf,
           spillover: Spillover) -> str:
    if selector.strategy == Strategy.PIN:
        return selector.targets[0]
    if selector.strategy == Strategy.WARM:
        return warm(config, selector, state)
    return spillover.choose(config, selector, state)


class Profiles:
    """Which profile is active: one or none. Startup and every reload select none
    (llama-swap's rule); the admin route switches it."""

    def __init__(self) -> None:
        self.active: str | None = None

    def select(self, config: Config, name: str | None) -> None:
        if name is not None and name not in config.profiles:
            raise KeyError(name)
        self.active = name
