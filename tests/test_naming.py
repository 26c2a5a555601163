"""Where a request's `model` goes (profile pin, selector, local name, peer) and the
selector strategies, as pure functions of the config and the engines' states."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from swapd.config.loader import load_config
from swapd.config.types import Config
from swapd.http.modelnames import Local, Profiles, Remote, Spillover, Unroutable, choose, resolve

CONFIG = """
    models:
      alpha: {cmd: a, aliases: [a1], name: Alpha}
      beta: {cmd: b}
      gamma: {cmd: c}
      model_x: {cmd: x}
    groups:
      pool: {swap: false, members: [alpha, beta, gamma]}
    peers:
      box: {proxy: "http://10.0.0.2:8080", models: [model_x, shared, only-box, org/deep]}
      cloud: {proxy: "https://api.example.com/v1", models: [shared, only-cloud]}
    selectors:
      warmest: {strategy: warm, targets: [beta, a1]}
      pinned: {strategy: pin, targets: [gamma, alpha]}
      spill: {strategy: spillover, targets: [alpha, beta, box/only-box],
              settings: {spillover: 2}}
    profiles:
      coding:
        description: for code
        pins: {llm-code: pinned, beta: ~, alpha: gamma}
      empty-string: {pins: {beta: ""}}
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    path = Path(tmp_path_factory.mktemp("naming")) / "config.yaml"
    path.write_text(textwrap.dedent(CONFIG))
    return load_config(path, environ={}).config


def states(**running: str):  # type: ignore[no-untyped-def]
    return lambda model: running.get(model, "stopped")


def route(config: Config, name: str, profile: str | None = None, **running: str):  # type: ignore[no-untyped-def]
    spill = Spillover()
    target, chosen = resolve(config, profile, name,
                             lambda s: choose(config, s, states(**running), spill))
    return target, chosen


def test_local_names_win_over_unqualified_peer_names(config: Config) -> None:
    target, _ = route(config, "model_x")
    assert isinstance(target, Local) and target.model.id == "model_x"
    target, _ = route(config, "box/model_x")  # the qualified name still reaches the peer
    assert isinstance(target, Remote) and (target.peer.id, target.model) == ("box", "model_x")


def test_unqualified_peer_names_need_exactly_one_provider(config: Config) -> None:
    target, _ = route(config, "only-cloud")
    assert isinstance(target, Remote) and target.label == "cloud/only-cloud"
    target, _ = route(config, "org/deep")  # a peer model id may contain '/'
    assert isinstance(target, Remote) and target.label == "box/org/deep"
    with pytest.raises(Unroutable) as info:
        route(config, "shared")  # two peers have it: ambiguous, so not routed
    assert info.value.status == 404
    target, _ = route(config, "cloud/shared")
    assert isinstance(target, Remote) and target.peer.proxy == "https://api.example.com/v1"


def test_aliases_and_unknown_names(config: Config) -> None:
    target, chosen = route(config, "a1")
    assert isinstance(target, Local) and target.model.id == "alpha" and target.requested == "a1"
    assert chosen is None
    with pytest.raises(Unroutable) as info:
        route(config, "nope")
    assert (info.value.status, info.value.code) == (404, "model_not_found")


def test_pin_always_takes_the_first_target(config: Config) -> None:
    target, chosen = route(config, "pinned", alpha="ready")
    assert isinstance(target, Local) and target.model.id == "gamma"
    assert chosen is not None and (chosen.selector, chosen.target) == ("pinned", "gamma")


@pytest.mark.parametrize(("running", "expected"), [
    ({}, "beta"),  # nothing runs: cold-start the first target
    ({"alpha": "ready"}, "alpha"),  # the first ready one (through its alias a1)
    ({"alpha": "starting"}, "alpha"),  # else one that is starting
    ({"alpha": "starting", "beta": "ready"}, "beta"),
    ({"alpha": "ready", "beta": "ready"}, "beta"),  # order decides between ready ones
    ({"beta": "stopping"}, "beta"),
    ({"alpha": "sleeping"}, "alpha"),  # else one asleep: a wake, not a cold start
    ({"alpha": "sleeping", "beta": "waking"}, "beta"),
])
def test_warm(config: Config, running: dict[str, str], expected: str) -> None:
    target, _ = route(config, "warmest", **running)
    assert isinstance(target, Local) and target.model.id == expected
    # setParamsByID is looked up by the name the selector led to
    assert target.requested == {"alpha": "a1", "beta": "beta"}[expected]


def test_spillover_fills_each_target_to_its_reservation_then_spills(config: Config) -> None:
    selector = config.selectors["spill"]
    spill = Spillover()
    running: dict[str, str] = {}
    picks = [choose(config, selector, states(**running), spill) for _ in range(2)]
    assert picks == ["alpha", "alpha"]  # cold: the first target, reserved up to 2
    assert choose(config, selector, states(**running), spill) == "beta"  # alpha is full
    running["alpha"] = running["beta"] = "ready"
    assert choose(config, selector, states(**running), spill) == "beta"  # least busy
    assert spill.inflight("spill", "alpha") == 2 and spill.inflight("spill", "beta") == 2
    assert choose(config, selector, states(**running), spill) == "box/only-box"  # the peer
    # everything full and nothing cold: the least busy, in turn
    more = {choose(config, selector, states(**running), spill) for _ in range(3)}
    assert more <= {"alpha", "beta", "box/only-box"}


def test_spillover_release_and_skipping_stopping_targets(config: Config) -> None:
    selector = config.selectors["spill"]
    spill = Spillover()
    _, chosen = resolve(config, None, "spill",
                             lambda s: choose(config, s, states(), spill))
    assert chosen is not None and chosen.reserved and chosen.real == "alpha"
    assert spill.inflight("spill", "alpha") == 1
    spill.release(chosen)
    assert spill.inflight("spill", "alpha") == 0
    # a stopping or crash-looping target takes nothing new
    assert choose(config, selector, states(alpha="stopping"), spill) == "beta"
    assert choose(config, selector, states(alpha="failed", beta="failed"),
                  spill) == "box/only-box"


def test_profiles_apply_before_selectors_and_aliases(config: Config) -> None:
    with pytest.raises(Unroutable):
        route(config, "llm-code")  # no profile active: not a name
    target, chosen = route(config, "llm-code", "coding")  # pin → selector → gamma
    assert isinstance(target, Local) and target.model.id == "gamma"
    assert chosen is not None and chosen.selector == "pinned"
    target, _ = route(config, "alpha", "coding")  # pins may shadow a model id
    assert isinstance(target, Local) and target.model.id == "gamma"
    for profile in ("coding", "empty-string"):
        with pytest.raises(Unroutable) as info:
            route(config, "beta", profile)  # ~ and "" turn a name off: 404
        assert info.value.status == 404 and profile in info.value.message
    target, _ = route(config, "beta")
    assert isinstance(target, Local)


def test_selectors_are_refused_where_none_may_be_chosen(config: Config) -> None:
    with pytest.raises(Unroutable) as info:
        resolve(config, None, "warmest", None)
    assert info.value.status == 400 and info.value.code == "selector_not_allowed"


def test_one_profile_or_none(config: Config) -> None:
    profiles = Profiles()
    assert profiles.active is None
    profiles.select(config, "coding")
    assert profiles.active == "coding"
    with pytest.raises(KeyError):
        profiles.select(config, "nope")
    assert profiles.active == "coding"
    profiles.select(config, None)
    assert profiles.active is None
