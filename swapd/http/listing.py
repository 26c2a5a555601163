"""`GET /v1/models`: llama-swap's listing (its `capabilities` fields and `meta.llamaswap`),
plus swapd's `state`, the last start failure and the expected start time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from swapd.config.types import Capabilities, Config, KeyConfig
from swapd.engines.starts import StartTimes
from swapd.http.keys import allows_model, allows_peer
from swapd.redact import clean_line
from swapd.schedule.runner import EngineView

ViewOf = Callable[[str], EngineView | None]


def models(config: Config, view_of: ViewOf, starts: StartTimes,
           active_profile: str | None, key: KeyConfig | None = None) -> list[dict[str, Any]]:
    """Configured models (with their state), then aliases (includeAliasesInList), peer
    models, selectors and the active profile's new names; of a key with a scope, only what
    it may use (docs/keys.md: the rest does not exist for it)."""
    data: list[dict[str, Any]] = []
    listed: set[str] = set()
    for model in config.models.values():
        listed.update((model.id, *model.aliases))
        if model.unlisted or not allows_model(key, model):
            continue
        view = view_of(model.id)
        entry = _entry(model.id, view.state if view else "stopped", model.name,
                       model.description, model.metadata, model.capabilities,
                       {"type": "model"})
        if view is not None and view.failures:
            entry["failure"] = {
                "reason": None if view.last_error is None else clean_line(view.last_error),
                "count": view.failures,
                "retry_at": view.next_retry_at,
            }
        if model.aliases:
            entry["meta"]["llamaswap"]["aliases"] = list(model.aliases)
        expected = starts.expected(model.id)
        if expected is not None:
            entry["start_seconds"] = round(expected, 1)
        eta = starts.loading_eta(view)
        if eta is not None:
            entry["eta_seconds"] = round(eta, 1)
        data.append(entry)
        if config.include_aliases_in_list:
            for alias in model.aliases:
                # A name of its own, so a UI does not show identical rows.
                name = f"{model.name} (alias {alias})" if model.name else None
                data.append(_entry(
                    alias, entry["state"], name, model.description, model.metadata,
                    model.capabilities, {"type": "alias", "modelID": model.id}))
    for peer in config.peers.values():
        for peer_model in peer.models:
            listed.add(f"{peer.id}/{peer_model}")
            if not allows_peer(key, peer.id, peer_model):
                continue
            data.append(_entry(f"{peer.id}/{peer_model}", "remote",
                               f"{peer.id}: {peer_model}", None, None, None,
                               {"type": "peer", "peerID": peer.id}))
    listed.update(config.peer_routes)
    for selector in config.selectors.values():
        listed.add(selector.id)
        if selector.unlisted or not _any_allowed(config, key, selector.targets):
            continue
        internal: dict[str, Any] = {"type": "selector", "strategy": str(selector.strategy),
                                    "targets": list(selector.targets)}
        if selector.strategy == "spillover":
            internal["spillover"] = selector.spillover
        data.append(_entry(selector.id, _selector_state(config, view_of, selector.targets),
                           selector.name, selector.description, selector.metadata, None,
                           internal))
    profile = config.profiles.get(active_profile or "")
    for pin, target in profile.pins if profile else ():
        if target is not None and pin not in listed and _any_allowed(config, key, (target,)):
            data.append(_entry(pin, _selector_state(config, view_of, (target,)), None, None,
                               None, None, {"type": "profile", "target": target}))
    for entry in data:
        entry["created"] = int(config.loaded_at)  # the config's load time, not 0
    return data


def _any_allowed(config: Config, key: KeyConfig | None, targets: tuple[str, ...]) -> bool:
    """Whether `key` may use one of `targets` (a selector's, or a profile pin's)."""
    if key is None or (key.models is None and key.peers is None):
        return True
    for target in targets:
        model = config.resolve(target)
        if model is not None and allows_model(key, model):
            return True
        route = config.peer_routes.get(target)
        if route is not None and allows_peer(key, *route):
            return True
    return False


def _state(view_of: ViewOf, model: str) -> str:
    view = view_of(model)
    return view.state if view is not None else "stopped"


def _selector_state(config: Config, view_of: ViewOf, targets: tuple[str, ...]) -> str:
    """The state of the first target that is ready or starting, else of the first."""
    states = []
    for target in targets:
        model = config.resolve(target)
        states.append(_state(view_of, model.id) if model else "remote")
    for wanted in ("ready", "starting"):
        if wanted in states:
            return wanted
    return states[0] if states else "stopped"


# States in which no process of the model runs (llama-swap: stopped, shutdown); a peer's
# model is "unloaded" there too.
_UNLOADED = frozenset({"stopped", "failed", "remote"})


def _entry(model_id: str, state: str, name: str | None, description: str | None,
           metadata: Any, caps: Capabilities | None,
           internal: dict[str, Any]) -> dict[str, Any]:
    """One /v1/models entry."""
    entry: dict[str, Any] = {
        "id": model_id, "object": "model", "created": 0, "owned_by": "swapd", "state": state,
        # llama-swap's field (what its clients read): loaded while a process is up.
        "status": {"value": "unloaded" if state in _UNLOADED else "loaded"},
    }
    if name:
        entry["name"] = name
    if description:
        entry["description"] = description
    if metadata:
        entry["metadata"] = metadata
    meta: dict[str, Any] = {"llamaswap": {**(metadata if isinstance(metadata, dict) else {}),
                                          **internal}}
    if caps is not None:
        _capabilities(entry, caps)
        if caps.context:
            meta["n_ctx"] = caps.context
    entry["meta"] = meta
    return entry


def _capabilities(entry: dict[str, Any], caps: Capabilities) -> None:
    """llama-swap's rendering of `capabilities` (OpenRouter's field names)."""
    ins, outs = caps.inputs, caps.outputs
    arch: dict[str, Any] = {}
    if ins:
        arch["input_modalities"] = list(ins)
    if outs:
        arch["output_modalities"] = list(outs)
    if ins and outs:
        arch["modality"] = "+".join(ins) + "->" + "+".join(outs)
    found: dict[str, bool] = {}
    if "image" in ins:
        found["vision"] = True
    for need_in, need_out, flag in (("audio", "text", "audio_transcriptions"),
                                    ("text", "audio", "audio_speech"),
                                    ("text", "image", "image_generation"),
                                    ("image", "image", "image_to_image")):
        if need_in in ins and need_out in outs:
            found[flag] = True
    if caps.tools:
        found["function_calling"] = True
        entry["supported_parameters"] = ["tools", "tool_choice"]
    if caps.reranker:
        found["reranker"] = True
    if arch:
        entry["architecture"] = arch
    if found:
        entry["capabilities"] = found
    if caps.context:
        entry["context_length"] = caps.context
