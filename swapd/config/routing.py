"""llama-swap's keys that decide where a request goes, loaded into frozen dataclasses:
`routing` (group or matrix router, fifo priority), `selectors`, `profiles`, `peers`,
`upstream.ignorePaths`, per-model `timeouts`, `capabilities`, `compat`,
`filters.setParamsByID`, and the top-level keys that mean little to swapd.

`swapd.config` calls in here while it loads a file; everything here sees an already
parsed `_Node` and fails with the key path. A reference to a model that is not defined
is a warning and the reference is dropped, as swapd does for group members: llama-swap's
own config.example.yaml names models it never defines, and it must load unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from swapd.config import recent
from swapd.config.nodes import ConfigError, Ctx, Node, is_http_url, show
from swapd.config.sizes import GiB, SizeError, parse_size
from swapd.config.types import (
    MODALITIES,
    MODEL_TIMEOUTS,
    PEER_TIMEOUTS,
    Capabilities,
    Config,
    GroupConfig,
    LogToStdout,
    ModelConfig,
    PeerConfig,
    ProfileConfig,
    RouterKind,
    Routing,
    SelectorConfig,
    Strategy,
    Timeouts,
)
from swapd.placement.matrix import MatrixError, Program, can_run_together, compile_sets, expand

_TIMEOUT_KEYS = frozenset(
    {"connect", "keepalive", "responseHeader", "tlsHandshake", "idleConn", "expectContinue"})
_VAR_NAME = re.compile(r"^[a-zA-Z0-9.-]{1,32}$")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# -- per model -------------------------------------------------------------------------


def timeouts(node: Node | None, default: Timeouts) -> Timeouts | None:
    """`timeouts:` of a model or peer; None when the section is absent."""
    if node is None:
        return None
    if "expectContinue" in node.data:
        node.ctx.warn(node.key("expectContinue"),
                      "swapd never sends Expect: 100-continue, so there is nothing to time out")
    return Timeouts(
        connect=float(node.number("connect", default.connect)),
        keepalive=float(node.number("keepalive", default.keepalive)),
        response_header=float(node.number("responseHeader", default.response_header)),
        tls_handshake=float(node.number("tlsHandshake", default.tls_handshake)),
        idle_conn=float(node.number("idleConn", default.idle_conn)),
    )


def model_timeouts(node: Node) -> Timeouts | None:
    return timeouts(node.child("timeouts", _TIMEOUT_KEYS), MODEL_TIMEOUTS)


def capabilities(node: Node) -> Capabilities | None:
    """`capabilities:`; omitted or all-zero means none (llama-swap's rule)."""
    caps = node.child("capabilities",
                      frozenset({"in", "out", "tools", "reranker", "context"}))
    if caps is None:
        return None
    modes: dict[str, tuple[str, ...]] = {}
    for key in ("in", "out"):
        values = [v.strip().lower() for v in caps.texts(key)]
        for i, value in enumerate(values):
            if value not in MODALITIES:
                caps.ctx.fail(f"{caps.key(key)}[{i}]",
                              f"must be one of {', '.join(MODALITIES)}, got {show(value)}")
        modes[key] = tuple(dict.fromkeys(values))
    out = Capabilities(
        inputs=modes["in"], outputs=modes["out"],
        tools=caps.flag("tools", False), reranker=caps.flag("reranker", False),
        context=caps.number("context", 0, integer=True),
    )
    return None if out == Capabilities() else out


def compat(node: Node) -> None:
    """`compat.ignoreWebsockets`: swapd relays no websocket upgrades, so a websocket
    never loads a model, holds a concurrency slot or counts as TTL activity already."""
    section = node.child("compat", frozenset({"ignoreWebsockets"}))
    if section is not None and section.flag("ignoreWebsockets", False):
        section.ctx.warn(section.key("ignoreWebsockets"),
                         "swapd does not relay websocket upgrades, so websockets never load "
                         "a model or count as activity: nothing more to ignore")


def set_params_by_id(ctx: Ctx, path: str, value: Any) -> dict[str, dict[str, Any]]:
    """Validate an expanded `filters.setParamsByID` ({requested id: {param: value}});
    `model` is protected and dropped with a warning."""
    out: dict[str, dict[str, Any]] = {}
    for key, params in ctx.mapping(value, path).items():
        where = f"{path}.{key}"
        if not str(key).strip():
            ctx.fail(path, "an id must not be empty")
        params = dict(ctx.mapping(params, where))
        if "model" in params:
            ctx.warn(f"{where}.model", '"model" cannot be overridden, ignored')
            del params["model"]
        out[str(key)] = params
    return out


# -- the top level ---------------------------------------------------------------------


class _Names:
    """Every name a request may use, to check references and collisions against."""

    def __init__(self, models: Mapping[str, ModelConfig]):
        self.models = models
        self.alias_of = {a: m.id for m in models.values() for a in m.aliases}
        self.peer_routes: dict[str, tuple[str, str]] = {}
        self.selectors: set[str] = set()

    def local(self, name: str) -> str | None:
        return name if name in self.models else self.alias_of.get(name)

    def known(self, name: str) -> bool:
        return self.local(name) is not None or name in self.peer_routes


def load(ctx: Ctx, top: Node, models: Mapping[str, ModelConfig],
         groups: tuple[GroupConfig, ...]) -> Routing:
    names = _Names(models)
    router, matrix = _router(ctx, top, models)
    reserve = _memory_reserve(top)
    peers, routes = _peers(ctx, top, names)
    names.peer_routes = routes
    selectors = _selectors(ctx, top, names, router, matrix, groups)
    names.selectors = set(selectors)
    return Routing(
        router=router,
        matrix=matrix,
        memory_reserve=reserve,
        priority=_priority(ctx, top, names),
        selectors=selectors,
        profiles=_profiles(ctx, top, names),
        peers=peers,
        peer_routes=routes,
        ignore_paths=_ignore_paths(top),
        log_to_stdout=_log_to_stdout(top),
        gpu_sampling=_performance(top),
    )


def _router(ctx: Ctx, top: Node,
            models: Mapping[str, ModelConfig]) -> tuple[RouterKind, Program | None]:
    # routing, router and settings had their keys checked by config._groups already.
    routing = top.child("routing", None)
    router = routing.child("router", None) if routing else None
    use = (router.text("use") or "").strip().lower() if router else ""
    settings = router.child("settings", None) if router else None
    raw = settings.data.get("matrix") if settings else None
    where = settings.key("matrix") if settings else ""
    if top.data.get("matrix") is not None:  # llama-swap's legacy top-level key
        if raw is not None or use:
            ctx.fail("matrix", "use routing.router.settings.matrix or the top-level matrix, "
                     "not both")
        raw, where, use = top.data["matrix"], "matrix", "matrix"
    if use not in ("", "group", "matrix", "memory"):
        ctx.fail("routing.router.use", f"must be group, matrix or memory, got {show(use)}")
    if use != "matrix":
        if raw is not None:
            ctx.warn(where, f"not used: routing.router.use is {use or 'group'} "
                     "(set it to matrix)")
        return (RouterKind.MEMORY if use == "memory" else RouterKind.GROUP), None
    if raw is None:
        ctx.fail("routing.router.settings.matrix",
                 "required when routing.router.use is matrix")
    return RouterKind.MATRIX, _matrix(Node(ctx, raw, where,
                                        frozenset({"vars", "evict_costs", "sets"})), models)


def _memory_reserve(top: Node) -> int:
    """routing.router.settings.memory.reserve: what the memory router keeps free."""
    routing = top.child("routing", None)
    router = routing.child("router", None) if routing else None
    settings = router.child("settings", None) if router else None
    memory = settings.child("memory", frozenset({"reserve"})) if settings else None
    value = memory.get("reserve") if memory else None
    if memory is None or value is None:
        return 8 * GiB
    try:
        return parse_size(value)
    except SizeError as exc:
        memory.ctx.fail(memory.key("reserve"), str(exc))


def _matrix(node: Node, models: Mapping[str, ModelConfig]) -> Program:
    ctx = node.ctx
    variables: dict[str, str] = {}
    if var_node := node.child("vars", None):
        for key, value in var_node.data.items():
            where = var_node.key(key)
            if not _VAR_NAME.match(str(key)):
                ctx.fail(where, "a var name is 1-32 letters, digits, '-' or '.'")
            target = ctx.text(value, where) or ""
            if target not in models:
                ctx.fail(where, f"{show(target)} is not a model id (a var names a model id, "
                         "not an alias)")
            variables[str(key)] = target

    def resolve(ident: str) -> str | None:
        return variables.get(ident) or (ident if ident in models else None)

    costs: dict[str, int] = {}
    if cost_node := node.child("evict_costs", None):
        for key in cost_node.data:
            model = resolve(str(key))
            if model is None:
                ctx.fail(cost_node.key(key), f"{show(str(key))} is not a var or model id")
            costs[model] = cost_node.number(str(key), 1, minimum=0, strict=True, integer=True)
    sets_node = node.child("sets", None)
    if sets_node is None or not sets_node.data:
        ctx.fail(node.key("sets"), "required: at least one named set")
    definitions = []
    for key, value in sets_node.data.items():
        definitions.append((str(key), ctx.text(value, sets_node.key(key)) or ""))
    try:
        return compile_sets(definitions, resolve, costs)
    except MatrixError as exc:
        ctx.fail(sets_node.path, str(exc))


def _priority(ctx: Ctx, top: Node, names: _Names) -> dict[str, int]:
    routing = top.child("routing", None)
    scheduler = routing.child("scheduler", frozenset({"use", "settings"})) if routing else None
    if scheduler is None:
        return {}
    use = (scheduler.text("use") or "fifo").strip().lower()
    if use != "fifo":
        ctx.fail(scheduler.key("use"), f"must be fifo (the only scheduler), got {show(use)}")
    settings = scheduler.child("settings", frozenset({"fifo"}))
    fifo = settings.child("fifo", frozenset({"priority"})) if settings else None
    table = fifo.child("priority", None) if fifo else None
    out: dict[str, int] = {}
    for key in table.data if table else ():
        assert table is not None
        value = table.number(str(key), 0, minimum=-(2**31), integer=True)
        model = names.local(str(key))
        if model is None:
            ctx.warn(table.key(key), f"{show(str(key))} is not a defined model, ignored")
        else:
            out[model] = value
    return out


def _filters(node: Node) -> tuple[tuple[str, ...], Any, Any]:
    filters = node.child("filters", frozenset({"stripParams", "setParams", "setParamsByID",
                                                "policy"}))
    recent.filter_policy(filters)
    if filters is None:
        return (), None, None
    ctx = filters.ctx
    strip = []
    for param in ",".join(filters.texts("stripParams")).split(","):
        param = param.strip()
        if param == "model":
            ctx.warn(filters.key("stripParams"), '"model" can never be stripped, ignored')
        elif param and param not in strip:
            strip.append(param)
    set_params = None
    if filters.data.get("setParams") is not None:
        where = filters.key("setParams")
        set_params = dict(ctx.tree(ctx.mapping(filters.data["setParams"], where), where))
        if set_params.pop("model", None) is not None:
            ctx.warn(f"{where}.model", '"model" cannot be overridden, ignored')
    by_id = None
    if filters.data.get("setParamsByID") is not None:
        where = filters.key("setParamsByID")
        by_id = set_params_by_id(ctx, where, ctx.tree(filters.data["setParamsByID"], where))
    return tuple(strip), set_params or None, by_id or None


def _peers(ctx: Ctx, top: Node,
           names: _Names) -> tuple[dict[str, PeerConfig], dict[str, tuple[str, str]]]:
    section = top.child("peers", None)
    peers: dict[str, PeerConfig] = {}
    fqns: dict[str, tuple[str, str]] = {}
    for key, raw in section.data.items() if section else ():
        peer_id = str(key)
        node = Node(ctx, raw, section.key(key) if section else "",
                     frozenset({"proxy", "apiKey", "models", "filters", "timeouts"}))
        if not peer_id.strip():
            ctx.fail("peers", "a peer id must not be empty")
        proxy = (node.text("proxy") or "").strip()
        if not is_http_url(proxy):
            ctx.fail(node.key("proxy"), f"required: an http:// or https:// URL, got {show(proxy)}")
        models = tuple(dict.fromkeys(m.strip() for m in node.texts("models") if m.strip()))
        # No models: a cluster peer only (checked once the models are known,
        # swapd.config.cluster.check).
        api_key, unset = None, None
        try:
            api_key = node.text("apiKey") or None
        except ConfigError as exc:  # ${env.X} unset: the rest of the config is still usable
            found = re.search(r"variable (\S+)", exc.detail)
            unset = found[1] if found else "?"
            ctx.warn(node.key("apiKey"), f"environment variable {unset} is not set: requests "
                     "to this peer are refused until it is set and the config reloaded")
        strip, set_params, by_id = _filters(node)
        peers[peer_id] = PeerConfig(
            id=peer_id, proxy=proxy.rstrip("/"), models=models, api_key=api_key,
            api_key_unset=unset,
            timeouts=timeouts(node.child("timeouts", _TIMEOUT_KEYS), PEER_TIMEOUTS)
            or PEER_TIMEOUTS,
            strip_params=strip, set_params=set_params, set_params_by_id=by_id,
        )
        for model in models:
            fqn = f"{peer_id}/{model}"
            where = node.key("models")
            if fqn in fqns:
                other = fqns[fqn]
                ctx.fail(where, f"{show(fqn)} is ambiguous: peer {other[0]} model "
                         f"{other[1]} has the same name")
            if names.local(fqn) is not None:
                ctx.fail(where, f"{show(fqn)} is already a model id or alias; "
                         "<peer>/<model> names are reserved for peers")
            fqns[fqn] = (peer_id, model)
    routes = dict(fqns)
    providers: dict[str, list[tuple[str, str]]] = {}
    for peer in peers.values():
        for model in peer.models:
            providers.setdefault(model, []).append((peer.id, model))
    for model, offered in providers.items():
        # Unqualified: only when exactly one peer has it and nothing local is so named.
        if len(offered) == 1 and model not in routes and names.local(model) is None:
            routes[model] = offered[0]
    return peers, routes


def _selectors(ctx: Ctx, top: Node, names: _Names, router: RouterKind,
               matrix: Program | None,
               groups: tuple[GroupConfig, ...]) -> dict[str, SelectorConfig]:
    section = top.child("selectors", None)
    raw_ids = {str(k) for k in section.data} if section else set()
    out: dict[str, SelectorConfig] = {}
    for key, raw in section.data.items() if section else ():
        sel_id = str(key)
        path = section.key(key) if section else ""
        node = Node(ctx, raw, path, frozenset(
            {"strategy", "targets", "settings", "name", "description", "metadata", "unlisted"}))
        if not sel_id.strip():
            ctx.fail("selectors", "a selector id must not be empty")
        if names.local(sel_id) is not None:
            ctx.fail(path, f"{show(sel_id)} is already a model id or alias")
        if sel_id in names.peer_routes and "/" in sel_id:
            ctx.fail(path, f"{show(sel_id)} is a <peer>/<model> name")
        strategy_text = (node.text("strategy") or "").strip().lower()
        if strategy_text not in {s.value for s in Strategy}:
            ctx.fail(node.key("strategy"), "required: warm, pin or spillover, got "
                     f"{show(strategy_text or None)}")
        strategy = Strategy(strategy_text)
        targets: list[str] = []
        resolved: list[str] = []
        for i, target in enumerate(t.strip() for t in node.texts("targets")):
            where = f"{node.key('targets')}[{i}]"
            if target in raw_ids:
                ctx.fail(where, f"{show(target)} is a selector: selectors cannot chain")
            local = names.local(target)
            if local is None and target not in names.peer_routes:
                ctx.warn(where, f"{show(target)} is not a defined model or peer model, ignored")
                continue
            if strategy == Strategy.WARM and local is None:
                ctx.fail(where, f"{show(target)} is a peer model: warm needs local models")
            real = local or "/".join(names.peer_routes[target])
            if strategy == Strategy.SPILLOVER and real in resolved:
                ctx.fail(where, f"{show(target)} is {show(real)} again")
            targets.append(target)
            resolved.append(real)
        settings = node.child("settings", frozenset({"spillover"}))
        spillover = settings.number("spillover", 1, minimum=1, integer=True) if settings else 1
        if not targets:
            ctx.warn(node.key("targets"), "no usable target, selector ignored")
            continue
        if strategy == Strategy.SPILLOVER:
            local_gpu = [r for r in resolved if r in names.models and names.models[r].gpu]
            if not _coexist(local_gpu, router, matrix, groups):
                ctx.fail(node.key("targets"), "spillover targets must be able to run together "
                         "(one matrix set, or one group with swap: false)")
        metadata = None
        if node.data.get("metadata") is not None:
            metadata = ctx.tree(node.data["metadata"], node.key("metadata"))
        out[sel_id] = SelectorConfig(
            id=sel_id, strategy=strategy, targets=tuple(targets), spillover=spillover,
            name=node.text("name") or None, description=node.text("description") or None,
            metadata=metadata or None, unlisted=node.flag("unlisted", False),
        )
    return out


def _coexist(models: list[str], router: RouterKind, matrix: Program | None,
             groups: tuple[GroupConfig, ...]) -> bool:
    if len(models) <= 1:
        return True
    if router == RouterKind.MATRIX:
        return matrix is not None and can_run_together(matrix, models)
    owner = [next((g for g in groups if m in g.members), None) for m in models]
    first = owner[0]
    return first is not None and not first.swap and all(g is first for g in owner)


def _profiles(ctx: Ctx, top: Node, names: _Names) -> dict[str, ProfileConfig]:
    section = top.child("profiles", None)
    out: dict[str, ProfileConfig] = {}
    for key, raw in section.data.items() if section else ():
        prof_id = str(key)
        path = section.key(key) if section else ""
        if not prof_id.strip():
            ctx.fail("profiles", "a profile name must not be empty")
        if isinstance(raw, list):
            ctx.warn(path, "a list is llama-swap's old profile form (models loaded together); "
                     "it is ignored: profiles are now {description, pins}, and models that "
                     "run together are a group with swap: false")
            continue
        node = Node(ctx, raw, path, frozenset({"description", "pins"}))
        pins_node = node.child("pins", None)
        if pins_node is None or not pins_node.data:
            ctx.fail(node.key("pins"), "required: at least one pin (name: target)")
        pins: list[tuple[str, str | None]] = []
        for pin, value in pins_node.data.items():
            where = pins_node.key(pin)
            pin = str(pin)
            if not pin.strip():
                ctx.fail(pins_node.path, "a pin name must not be empty")
            if "/" in pin and pin in names.peer_routes:
                ctx.fail(where, f"{show(pin)} is a <peer>/<model> name")
            target = (ctx.text(value, where) or "").strip() or None
            if target is not None and not (names.known(target) or target in names.selectors):
                ctx.warn(where, f"{show(target)} is not a defined model, alias, peer model "
                         "or selector, ignored")
                continue
            pins.append((pin, target))
        out[prof_id] = ProfileConfig(id=prof_id, pins=tuple(pins),
                                     description=node.text("description") or None)
    return out


def _ignore_paths(top: Node) -> tuple[re.Pattern[str], ...]:
    section = top.child("upstream", frozenset({"ignorePaths"}))
    if section is None:
        return ()
    out = []
    for i, pattern in enumerate(section.texts("ignorePaths")):
        try:
            out.append(re.compile(pattern))
        except re.error as exc:
            section.ctx.fail(f"{section.key('ignorePaths')}[{i}]",
                             f"invalid regular expression: {exc}")
    return tuple(out)


def _log_to_stdout(top: Node) -> LogToStdout:
    """`logToStdout`: what swapd's stdout (journald) carries. Left out, swapd's own log
    and engine output both, as before; llama-swap's `proxy` leaves engine output out."""
    text = top.text("logToStdout")
    if text is None:
        return LogToStdout.BOTH
    choices = {m.value for m in LogToStdout}
    if text.strip().lower() not in choices:
        top.ctx.fail("logToStdout", f"must be one of proxy, upstream, both, none, "
                     f"got {show(text)}")
    mode = LogToStdout(text.strip().lower())
    if mode in (LogToStdout.UPSTREAM, LogToStdout.NONE):
        top.ctx.warn("logToStdout", "swapd's own log always goes to stdout (it is what "
                     "journald keeps); only engine output follows this setting")
    return mode


def duration(text: str) -> float | None:
    """A Go duration ("15s", "1h30m", "500ms") in seconds; None if it is not one."""
    text = text.strip()
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION.match(text, pos)
        if not m:
            return None
        total += float(m[1]) * _UNIT[m[2]]
        pos = m.end()
    return total if text else None


def _performance(top: Node) -> bool:
    """`performance`: `disabled: true` turns GPU sampling off (no GPU series in
    /metrics); `every` is validated like llama-swap's (≥ 5s) and otherwise ignored."""
    node = top.child("performance", frozenset({"disabled", "every"}))
    if node is None:
        return True
    raw = node.data.get("every")
    if raw is not None:
        seconds = duration(str(node.get("every")))
        if seconds is None or seconds < 5:
            top.ctx.fail(node.key("every"), f"must be a duration of at least 5s, got {show(raw)}")
        top.ctx.warn(node.key("every"), "swapd samples the GPU every second for /metrics; "
                     "this interval is not used")
    return not node.flag("disabled", False)


# Top-level keys llama-swap has that change nothing in swapd, and why (one warning each).
NO_EFFECT = {
    "logTimeFormat": "swapd stamps every log line with an ISO-8601 UTC time "
                     "(journald adds its own); this format is not used",
    "logRequests": "swapd counts every request in /metrics and logs failed ones; it writes "
                   "no line per request",
    "store.path": "swapd's activity records persist with activity.store: sqlite under "
                  "stateDir; store.path is not used",
}


def no_effect(top: Node) -> None:
    activity = top.data.get("activity")
    if top.data.get("metricsMaxInMemory") is not None and isinstance(activity, dict) and \
            activity.get("size") is not None:
        top.ctx.warn("metricsMaxInMemory", "activity.size is set too and wins (both say how "
                     "many request records are kept)")
    for key, why in NO_EFFECT.items():
        head, _, tail = key.partition(".")
        value = top.data.get(head)
        if tail:
            value = value.get(tail) if isinstance(value, dict) else None
        if value is None or (key == "logTimeFormat" and value == ""):
            continue
        top.ctx.warn(key, why)


def check_lines(config: Config) -> list[str]:
    """What `swapd check` prints about these keys (never a peer's apiKey)."""
    lines = []
    if config.matrix is not None:
        lines.append("router: matrix")
        for matrix_set in config.matrix.sets:
            concrete = " ".join(f"[{', '.join(s)}]" for s in expand(config.matrix,
                                                                   matrix_set.name))
            lines.append(f"  {matrix_set.name}: {matrix_set.expression} → {concrete}")
        if config.matrix.evict_costs:
            costs = ", ".join(f"{m}={c}" for m, c in config.matrix.evict_costs)
            lines.append(f"  evict_costs: {costs} (others 1)")
    if config.priority:
        ranked = sorted(config.priority.items(), key=lambda kv: -kv[1])
        lines.append("priority: " + ", ".join(f"{m}={p}" for m, p in ranked))
    for sel in config.selectors.values():
        extra = f" spillover={sel.spillover}" if sel.strategy == Strategy.SPILLOVER else ""
        lines.append(f"selector {sel.id}: {sel.strategy} → {', '.join(sel.targets)}{extra}")
    for prof in config.profiles.values():
        pins = ", ".join(f"{pin} → {target or '404'}" for pin, target in prof.pins)
        lines.append(f"profile {prof.id}: {pins}")
    for peer in config.peers.values():
        key = ("apiKey set" if peer.api_key else
               f"apiKey needs {peer.api_key_unset}" if peer.api_key_unset else "no apiKey")
        lines.append(f"peer {peer.id}: {peer.proxy} ({key}) models: {', '.join(peer.models)}")
    if config.global_concurrency_limit:
        lines.append(f"globalConcurrencyLimit: {config.global_concurrency_limit} (429 past it)")
    if config.startup_profile:
        lines.append(f"startup profile: {config.startup_profile}")
    pinned = [m.id for m in config.models.values() if not m.swappable]
    if pinned:
        lines.append("swappable: false (a request for another model never stops them): "
                     + ", ".join(pinned))
    if config.ignore_paths:
        lines.append("upstream.ignorePaths: " + ", ".join(p.pattern for p in config.ignore_paths))
    return lines
