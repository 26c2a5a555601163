"""Configuration: llama-swap's YAML format, loaded into frozen dataclasses.

Everything here is immutable once loaded; a reload builds a new `Config` and the
scheduler compares `ModelConfig`s by equality to decide which engines keep running.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from swapd.config import cluster, configdir, recent
from swapd.config.keys import load_keys
from swapd.config.nodes import (
    ConfigError,
    Ctx,
    DuplicateKeyLoader,
    Node,
    include_files,
    is_http_url,
    show,
    spell,
    split_host_port,
    valid_id,
)

# EngineKind and the precedence of recipe, preset and file live in swapd.presets.
from swapd.config.presets import (
    Call,
    EngineKind,
    FileWide,
    Recipe,
    engine_kind,
    preset_for,
    settle,
)
from swapd.config.routing import (
    capabilities,
    compat,
    load,
    model_timeouts,
    no_effect,
    set_params_by_id,
)
from swapd.config.sizes import (
    DEFAULT_FLOOR,
    SizeError,
    parse_floor,
    parse_percent,
    parse_size,
)
from swapd.config.types import (
    Config,
    GroupConfig,
    LoadResult,
    MemoryGuardConfig,
    ModelConfig,
    RestartPolicy,
    SleepPolicy,
)

# -- loading ---------------------------------------------------------------------------

PYTHON = sys.executable or "python3"
_REF = re.compile(r"\$\{([a-zA-Z0-9_-]+)\}")
_MACRO_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,63}$")
_DEFAULT_PROXY = "http://127.0.0.1:${PORT}"
_LOG_LEVELS = ("debug", "info", "warn", "error")
_TOP_KEYS = frozenset(
    "healthCheckTimeout logLevel startPort globalTTL unloadTimeout macros apiKeys hooks groups "
    "routing includeAliasesInList sendLoadingState models listen adminKeys stateDir maxQueue "
    "queueTimeout shutdownTimeout logBufferLines maxBodyBytes include allowedHosts cors "
    "bodyTimeout headerTimeout writeTimeout keys "
    # llama-swap's, loaded by swapd/config_routing.py
    "profiles selectors peers upstream matrix logTimeFormat logToStdout metricsMaxInMemory "
    "performance logRequests store activity captureBuffer ui memoryGuard".split()
) | recent.TOP_KEYS
_MODEL_KEYS = frozenset(
    "cmd cmdStop proxy checkEndpoint ttl unloadTimeout env aliases useModelName unlisted name "
    "description metadata concurrencyLimit filters sendLoadingState macros engine gpu "
    "healthCheckTimeout restart memoryReleaseTimeout forwardClientAuth timeouts capabilities "
    "compat memory swappable sleepMode sleepEndpoints wakeEndpoints sleepMinFreed sleepTimeout "
    "sleepTtl clusterWorker cluster".split()
)
_CALL_KEYS = frozenset({"endpoint", "method", "body", "timeout"})
_CALL_METHODS = ("GET", "POST", "PUT", "PATCH")


def _strip_comments(text: str) -> str:
    return "\n".join(ln for ln in text.split("\n") if not ln.strip().startswith("#"))


def _argv(ctx: Ctx, path: str, text: str) -> tuple[str, ...]:
    lines = []
    for line in _strip_comments(text).split("\n"):
        # A shell-style continuation: POSIX shlex would keep the newline as an argument.
        stripped = line.strip()
        lines.append(stripped[:-1] + " " if stripped.endswith("\\") else line)
    try:
        argv = shlex.split("\n".join(lines))
    except ValueError as exc:
        ctx.fail(path, f"cannot be split into arguments: {exc}")
    if not argv:
        ctx.fail(path, "must not be empty")
    return tuple(argv)


# Longest string a macro expansion may produce: macros that double each other would
# otherwise grow a few hundred bytes of YAML into gigabytes.
MAX_EXPANDED = 64 * 1024
# Most values a YAML document may expand to through aliases (`*a` shares, a walk copies).
MAX_VALUES = 1_000_000


class _TooLong(Exception):
    pass


def _anchor(argv: tuple[str, ...], folder: str | None) -> tuple[str, ...]:
    """Relative paths in a command resolve against the config file's folder, never against
    swapd's working directory (`/` under systemd): cmd[0] when it has a slash
    (`./bin/llama-server`), and an argument with a slash that names a file or folder there
    (`examples/cpu_llama_server.py`). Other arguments are left alone: `Qwen/Qwen3-8B` is a
    Hugging Face repo, not a path, unless such a folder exists beside the config."""
    if folder is None:
        return argv
    out = list(argv)
    for i, arg in enumerate(argv):
        if "/" not in arg or os.path.isabs(arg) or arg.startswith(("-", "~")) or "=" in arg:
            continue
        path = os.path.normpath(os.path.join(folder, arg))
        if i == 0 or os.path.exists(path):
            out[i] = path
    return tuple(out)


def _expand(value: Any, macros: Mapping[str, Any], typed: bool = True) -> Any:
    """Substitute macros in strings, recursively. A string that is exactly one macro
    takes the macro's value with its type (`port: ${PORT}` stays a number).
    Raises _TooLong when substitution grows a string past MAX_EXPANDED characters (a long
    value as written may stay long), before building the long string."""
    if isinstance(value, str):
        whole = _REF.fullmatch(value)
        if typed and whole and whole[1] in macros:
            return macros[whole[1]]
        size = len(value)
        limit = max(MAX_EXPANDED, size)

        def one(m: re.Match[str]) -> str:
            nonlocal size
            if m[1] not in macros:
                return m[0]
            text = spell(macros[m[1]])
            size += len(text) - len(m[0])
            if size > limit:
                raise _TooLong
            return text

        return _REF.sub(one, value)
    if isinstance(value, dict):
        return {k: _expand(v, macros, typed) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, macros, typed) for v in value]
    return value


def _macro_defs(ctx: Ctx, node: Node | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in node.data.items() if node else ():
        path = node.key(name) if node else ""
        if not isinstance(name, str) or not _MACRO_NAME.match(name):
            ctx.fail(path, "macro names must match ^[a-zA-Z0-9_-]+$ and be under 64 characters")
        if name in ("PID", "PORT", "MODEL_ID"):
            ctx.fail(path, f"{name} is a reserved macro name")
        value = ctx.value(raw, path)
        if not isinstance(value, str | int | float):
            ctx.fail(path, f"must be a string, number or boolean, got {show(value)}")
        if isinstance(value, str) and f"${{{name}}}" in value:
            ctx.fail(path, "a macro cannot refer to itself")
        out[name] = value
    return out


def _resolve(model_id: str, base: Mapping[str, Any], local: Mapping[str, Any]) -> dict[str, Any]:
    """A model's macros. Each sees only those defined before it (llama-swap substitutes in
    reverse order); a model macro overriding a global one keeps the global's place, so
    globals built from it follow the override."""
    # PYTHON: the interpreter swapd runs on, for engines installed beside it (the demo's
    # llama-cpp-python). A bare `python` would be whatever PATH finds: under systemd, none.
    # Not reserved: a config's own PYTHON macro wins.
    resolved: dict[str, Any] = {"MODEL_ID": model_id, "PYTHON": shlex.quote(PYTHON)}
    for name, value in {**base, **local}.items():
        resolved[name] = _expand(value, resolved)
    return resolved


def _leftovers(ctx: Ctx, path: str, value: Any, macros: Mapping[str, Any], pid_ok: bool) -> None:
    if isinstance(value, dict | list):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            _leftovers(ctx, f"{path}.{k}" if isinstance(value, dict) else f"{path}[{k}]",
                       v, macros, pid_ok)
        return
    for name in _REF.findall(value) if isinstance(value, str) else ():
        if name == "PID" and not pid_ok:
            ctx.fail(path, "${PID} is only available in cmdStop")
        if name == "PORT":
            ctx.fail(path, "${PORT} is only assigned when cmd or proxy uses it")
        if name in macros:
            ctx.fail(path, f"macro ${{{name}}} is used by a macro defined before it")
        if name != "PID":
            ctx.fail(path, f"unknown macro ${{{name}}}")


@dataclass
class _Texts:
    """A model's strings that take macros, keyed by their path below the model, and its
    JSON trees (metadata, setParams): phase 1's output, substituted in place by phase 2."""

    texts: dict[str, str]
    trees: dict[str, Any]
    env_keys: dict[str, str]  # env name -> its key in `texts`
    strip_key: str  # where stripParams was written (llama-swap has two spellings)


_TOO_LONG = f"expands to more than {MAX_EXPANDED // 1024} KiB (macros that repeat each other?)"


def _model_texts(ctx: Ctx, node: Node) -> _Texts:
    """Phase 1: every string and tree of a model entry, as written (`${env.X}` read)."""

    def command(key: str) -> str:
        # Comments go first, so that `# needs ${env.X}` in a `|` block needs nothing.
        raw = node.data.get(key)
        return ctx.text(_strip_comments(raw) if isinstance(raw, str) else raw, node.key(key)) or ""

    texts: dict[str, str] = {"cmd": command("cmd")}
    if not texts["cmd"].strip():
        ctx.fail(node.key("cmd"), "required: the command that starts the engine")
    if stop := command("cmdStop"):
        texts["cmdStop"] = stop
    for key in ("checkEndpoint", "name", "description", "useModelName"):
        if value := node.text(key):
            texts[key] = value
    texts["proxy"] = node.text("proxy") or _DEFAULT_PROXY
    raw_aliases = node.data.get("aliases")
    for i, alias in enumerate(raw_aliases if isinstance(raw_aliases, list) else []):
        where = f"{node.key('aliases')}[{i}]"
        if isinstance(alias, dict):  # llama-swap's newer {id, name, unlisted} form
            alias = Node(ctx, alias, where, frozenset({"id"})).data.get("id")
        texts[f"aliases[{i}]"] = ctx.text(alias, where) or ""
    if raw_aliases is not None and not isinstance(raw_aliases, list):
        texts["aliases[0]"] = node.texts("aliases")[0]
    env_keys = _env(ctx, node, texts)
    filters = node.child("filters", frozenset(
        {"stripParams", "strip_params", "setParams", "setParamsByID", "policy"}))
    recent.filter_policy(filters)
    strip_key = "filters.strip_params"  # llama-swap's older spelling
    if filters and "strip_params" not in filters.data:
        strip_key = "filters.stripParams"
    if filters and filters.data.get(strip_key[8:]) is not None:
        texts[strip_key] = ",".join(filters.texts(strip_key[8:]))
    trees: dict[str, Any] = {}
    if node.data.get("metadata") is not None:
        trees["metadata"] = ctx.tree(node.data["metadata"], node.key("metadata"))
    if filters and filters.data.get("setParams") is not None:
        where = filters.key("setParams")
        trees["filters.setParams"] = ctx.tree(ctx.mapping(filters.data["setParams"], where), where)
    if filters and filters.data.get("setParamsByID") is not None:
        where = filters.key("setParamsByID")
        # Pairs, not a mapping: the ids take macros too ("${MODEL_ID}:high").
        trees["filters.setParamsByID"] = [
            [str(k), v] for k, v in ctx.tree(ctx.mapping(filters.data["setParamsByID"], where),
                                             where).items()]
    return _Texts(texts, trees, env_keys, strip_key)


def _macros_and_port(ctx: Ctx, node: Node, model_id: str, base: Config, t: _Texts,
                     next_port: Callable[[], int]) -> None:
    """Phase 2: substitute the model's macros, then ${PORT} when cmd or proxy uses it;
    anything left unresolved is an error naming its key."""
    try:
        macros = _resolve(model_id, dict(base.macros),
                          _macro_defs(ctx, node.child("macros", None)))
    except _TooLong:
        ctx.fail(node.key("macros"), _TOO_LONG)

    def substitute(values: Mapping[str, Any]) -> None:
        for key, text in t.texts.items():
            try:
                t.texts[key] = _expand(text, values, typed=False)
            except _TooLong:
                ctx.fail(node.key(key), _TOO_LONG)
        for key, tree in t.trees.items():
            try:
                t.trees[key] = _expand(tree, values)
            except _TooLong:
                ctx.fail(node.key(key), _TOO_LONG)

    substitute(macros)
    texts = t.texts
    if "${PORT}" in texts["cmd"] or "${PORT}" in texts["proxy"]:
        port = next_port()
        # `ollama serve` takes its address from env OLLAMA_HOST=127.0.0.1:${PORT}.
        # A cluster worker (`ray start --block`) serves no port: nothing to warn about.
        if not any("${PORT}" in texts[k] for k in ("cmd", *t.env_keys.values())) \
                and node.data.get("clusterWorker") is not True:
            ctx.warn(node.key("proxy"), f"${{PORT}} is {port} here but neither cmd nor env "
                     f"uses ${{PORT}}: the engine must listen on {port} by itself")
        substitute({"PORT": port})
    for key, value in [*texts.items(), *t.trees.items()]:
        _leftovers(ctx, node.key(key), value, macros, pid_ok=key == "cmdStop")


def _model(ctx: Ctx, model_id: str, raw: Any, base: Config,
           next_port: Callable[[], int]) -> ModelConfig:
    """One model entry, in phases: its texts, then macros and ${PORT}, then its engine's
    preset (swapd.presets.settle), then the frozen ModelConfig."""
    node = Node(ctx, raw, f"models.{model_id}", _MODEL_KEYS)
    t = _model_texts(ctx, node)
    _macros_and_port(ctx, node, model_id, base, t, next_port)
    texts, trees, env_keys, strip_key = t.texts, t.trees, t.env_keys, t.strip_key

    proxy = texts["proxy"]
    if not is_http_url(proxy):
        ctx.fail(node.key("proxy"), f"must be an http:// or https:// URL, got {show(proxy)}")
    engine_name = node.text("engine")
    engine = engine_kind(engine_name) if engine_name else None
    if engine_name and engine is None:
        ctx.fail(node.key("engine"), "must be one of vllm, llama.cpp, sglang, trtllm, ollama, "
                 f"got {show(engine_name)}")
    # -- preset: the recipe, then its engine's preset, then the file (swapd.presets.settle)
    env = {name: texts[key] for name, key in env_keys.items()}
    settled = settle(engine, Recipe(
        check_endpoint=texts.get("checkEndpoint"),
        health_check_timeout=None if node.get("healthCheckTimeout") is None
        else float(node.number("healthCheckTimeout", 0, strict=True)),
        unload_timeout=None if node.get("unloadTimeout") is None
        else float(node.number("unloadTimeout", 0)),
        env=env,
        has_cmd_stop="cmdStop" in texts,
        model_name=texts.get("useModelName") or model_id,
    ), FileWide(base.health_check_timeout, base.unload_timeout))
    # -- build
    check: str | None = settled.check_endpoint
    if settled.check_endpoint.strip().lower() == "none":
        check = None
    elif not settled.check_endpoint.startswith("/"):
        check = "/" + settled.check_endpoint
    ttl = base.global_ttl if node.get("ttl") == -1 else node.number("ttl", base.global_ttl)
    strip: list[str] = []
    for param in (p.strip() for p in texts.get(strip_key, "").split(",")):
        if param == "model":
            ctx.warn(node.key(strip_key), '"model" can never be stripped, ignored')
        elif param and param not in strip:
            strip.append(param)
    set_params = trees.get("filters.setParams")
    if set_params and "model" in set_params:
        ctx.warn(node.key("filters.setParams.model"), '"model" cannot be overridden, ignored')
        del set_params["model"]
    restart = RestartPolicy()
    if r := node.child("restart", frozenset({"maxRetries", "backoffInitial", "backoffMax"})):
        restart = RestartPolicy(
            max_retries=r.number("maxRetries", 3, integer=True),
            backoff_initial=float(r.number("backoffInitial", 1.0, strict=True)),
            backoff_max=float(r.number("backoffMax", 60.0, strict=True)),
        )
        if restart.backoff_max < restart.backoff_initial:
            ctx.fail(r.key("backoffMax"), "must be ≥ backoffInitial")
    aliases = {k: v for k, v in texts.items() if k.startswith("aliases[")}
    for key, alias in aliases.items():
        if not alias.strip():
            ctx.fail(node.key(key), "must be a non-empty string")
    # Imported here: config_routing builds on this module's Node and Ctx.

    by_id = None
    if "filters.setParamsByID" in trees:
        by_id = set_params_by_id(
            ctx, node.key("filters.setParamsByID"),
            {spell(k): v for k, v in trees["filters.setParamsByID"]}) or None
        for i, requested in enumerate(by_id or ()):
            if requested != model_id:  # each other id is an alias of this model (llama-swap)
                aliases[f"filters.setParamsByID[{i}]"] = requested
    compat(node)
    folder = os.path.dirname(base.source) if base.source else None
    sleep = _sleep(node, engine)
    worker = node.flag("clusterWorker", False)
    head = cluster.cluster_of(node)
    if worker and head is not None:
        ctx.fail(node.key("clusterWorker"), "a model is a cluster head (cluster:) or a "
                 "worker (clusterWorker: true), not both")
    if (worker or head is not None) and sleep is not None:
        ctx.warn(node.key("sleepMode"), "ignored: a cluster head or worker is stopped, never "
                 "put to sleep (its peers' workers would stay held for nothing)")
        sleep = None
    if worker:
        if node.get("ttl") not in (None, 0, -1):
            ctx.warn(node.key("ttl"), "ignored: a cluster worker runs exactly as long as its "
                     "hold (the head's ttl stops both)")
        ttl = 0
    return ModelConfig(
        id=model_id,
        cmd=_anchor(_argv(ctx, node.key("cmd"), texts["cmd"]), folder),
        cmd_stop=_anchor(_argv(ctx, node.key("cmdStop"), texts["cmdStop"]), folder)
        if "cmdStop" in texts else None,
        proxy=proxy,
        check_endpoint=check,
        ttl=float(ttl),
        unload_timeout=settled.unload_timeout,
        env=settled.env,
        aliases=tuple(dict.fromkeys(aliases.values())),
        use_model_name=texts.get("useModelName"),
        unlisted=node.flag("unlisted", False) or worker,  # a worker is never listed
        name=texts.get("name"),
        description=texts.get("description"),
        metadata=trees.get("metadata"),
        concurrency_limit=node.number("concurrencyLimit", 0, integer=True),
        strip_params=tuple(strip),
        set_params=set_params or None,
        send_loading_state=node.flag("sendLoadingState", base.send_loading_state),
        engine=engine,
        gpu=node.flag("gpu", True),
        swappable=node.flag("swappable", True),
        health_check_timeout=settled.health_check_timeout,
        restart=restart,
        memory_release_timeout=float(node.number("memoryReleaseTimeout", 30.0)),
        env_remove=settled.env_remove,
        unload_request=settled.unload_request,
        forward_client_auth=node.flag("forwardClientAuth", False),
        timeouts=model_timeouts(node),
        capabilities=capabilities(node),
        set_params_by_id=by_id,
        memory=_size(node, "memory"),
        sleep=sleep,
        cluster_worker=worker,
        cluster=head,
    )


def _sleep(node: Node, engine: EngineKind | None) -> SleepPolicy | None:
    """llmsnap's sleep keys: `sleepMode`, `sleepEndpoints`, `wakeEndpoints`, and swapd's
    `sleepMinFreed`, `sleepTimeout`, `sleepTtl`. None: the engine is stopped as always."""
    ctx = node.ctx
    mode = node.get("sleepMode")
    if isinstance(mode, bool):  # `sleepMode: on` is YAML 1.1's true
        mode = "enable" if mode else "disable"
    if mode is not None and (not isinstance(mode, str)
                             or mode.strip().lower() not in ("enable", "disable")):
        ctx.fail(node.key("sleepMode"), f"must be enable or disable, got {show(mode)}")
    sleep, wake = _calls(node, "sleepEndpoints"), _calls(node, "wakeEndpoints")
    if bool(sleep) != bool(wake):
        given, missing = ("sleepEndpoints", "wakeEndpoints") if sleep else (
            "wakeEndpoints", "sleepEndpoints")
        ctx.fail(node.key(missing), f"required when {given} is given (llmsnap's rule): an "
                 "engine put to sleep must be woken")
    timeout = float(node.number("sleepTimeout", 30.0, strict=True))
    ttl = float(node.number("sleepTtl", 0.0))
    min_freed, percent = None, 50.0
    if (raw := node.get("sleepMinFreed")) is not None:
        try:
            found = parse_percent(raw)
            if found is None:
                min_freed = parse_size(raw)
            else:
                percent = found
        except SizeError as exc:
            ctx.fail(node.key("sleepMinFreed"), f"{exc} (or a percentage of the learned "
                     "footprint, \"50%\")")
    if mode is None or mode.strip().lower() != "enable":
        if sleep:
            ctx.warn(node.key("sleepEndpoints"), "not used: sleepMode is not enable, the "
                     "engine is stopped on a swap")
        return None
    if not sleep:
        preset = preset_for(engine)
        if preset is None or not preset.sleep:
            what = f"engine {engine}" if engine else "a recipe without `engine:`"
            ctx.warn(node.key("sleepMode"), f"{what} has no sleep of its own and no "
                     "sleepEndpoints are given: the engine is stopped on a swap")
            return None
        sleep, wake = preset.sleep, preset.wake
    return SleepPolicy(sleep=sleep, wake=wake, min_freed=min_freed,
                       min_freed_percent=percent, timeout=timeout, ttl=ttl)


def _calls(node: Node, key: str) -> tuple[Call, ...]:
    """`sleepEndpoints` / `wakeEndpoints`: a list of `{endpoint, method, body, timeout}`."""
    ctx = node.ctx
    raw = node.data.get(key)
    if raw is None:
        return ()
    if not isinstance(raw, list):
        ctx.fail(node.key(key), f"must be a list of {{endpoint, method, body, timeout}}, "
                 f"got {show(raw)}")
    out = []
    for i, item in enumerate(raw):
        call = Node(ctx, item, f"{node.key(key)}[{i}]", _CALL_KEYS)
        path = (call.text("endpoint") or "").strip()
        # The engine's own address only: a recipe cannot make swapd call another host.
        if not path.startswith("/") or path.startswith("//") or any(
                c.isspace() or ord(c) < 32 for c in path) or len(path) > 2048:
            ctx.fail(call.key("endpoint"), "must be a path on the engine's own address "
                     f"(/sleep?level=2), got {show(path)}")
        method = (call.text("method") or "POST").strip().upper()
        if method not in _CALL_METHODS:
            ctx.fail(call.key("method"), f"must be one of {', '.join(_CALL_METHODS)}, "
                     f"got {show(method)}")
        body = call.data.get("body")
        if isinstance(body, dict | list):
            body = json.dumps(ctx.tree(body, call.key("body")))
        else:
            body = call.text("body")
        out.append(Call(path=path, method=method, body=body or None,
                        timeout=float(call.number("timeout", 0.0))))
    return tuple(out)


def _size(node: Node, key: str) -> int | None:
    value = node.get(key)
    if value is None:
        return None
    try:
        return parse_size(value)
    except SizeError as exc:
        node.ctx.fail(node.key(key), str(exc))


def _memory_guard(top: Node) -> MemoryGuardConfig:
    node = top.child("memoryGuard", frozenset({"enabled", "floor"}))
    if node is None:
        return MemoryGuardConfig()
    floor = DEFAULT_FLOOR
    if (value := node.get("floor")) is not None:
        try:
            floor = parse_floor(value)
        except SizeError as exc:
            node.ctx.fail(node.key("floor"), f"{exc} (or a percentage of MemTotal, \"3%\")")
    return MemoryGuardConfig(enabled=node.flag("enabled", True), floor=floor)


def _env(ctx: Ctx, node: Node, texts: dict[str, str]) -> dict[str, str]:
    """Put `env` ("K=V" list, or a mapping) into `texts`; returns name → texts key, the
    last of two equal names winning as in a shell."""
    raw = node.data.get("env")
    names: dict[str, str] = {}
    if isinstance(raw, dict):
        for name, value in raw.items():
            texts[f"env.{name}"] = ctx.text(value, node.key(f"env.{name}")) or ""
            names[str(name)] = f"env.{name}"
        return names
    for i, item in enumerate(node.texts("env")):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or "\0" in item:
            ctx.fail(f"{node.key('env')}[{i}]", f"must be NAME=VALUE, got {show(item)}")
        texts[f"env[{i}]"] = value
        names[name.strip()] = f"env[{i}]"
    return names


def _read(ctx: Ctx, path: str) -> dict[Any, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        ctx.fail("", f"cannot read: {getattr(exc, 'strerror', None) or exc}")
    try:
        data = yaml.load(text, Loader=DuplicateKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        ctx.fail("", f"invalid YAML: {where}{getattr(exc, 'problem', None) or exc}")
    if data is not None and not isinstance(data, dict):
        ctx.fail("", f"must be a mapping of settings, got {show(data)}")
    if expanded_size(data) > MAX_VALUES:
        ctx.fail("", f"expands to more than {MAX_VALUES} values through YAML aliases")
    return data or {}


def expanded_size(data: Any) -> int:
    """How many values `data` holds once every shared (aliased) part is copied: what a walk
    over it costs. Linear in the distinct containers, whatever the expansion."""
    sizes: dict[int, int] = {}

    def size(value: Any) -> int:
        if not isinstance(value, dict | list):
            return 1
        known = sizes.get(id(value))
        if known is not None:
            return known
        # A container that holds itself (`&a [*a]`) expands forever.
        sizes[id(value)] = MAX_VALUES + 1
        children = value.values() if isinstance(value, dict) else value
        total = 1 + sum(size(child) for child in children)
        sizes[id(value)] = total
        return total

    return size(data)


def _keys(node: Node, key: str) -> tuple[str, ...]:
    keys = node.texts(key)
    for i, value in enumerate(keys):
        if not value or any(c.isspace() for c in value):
            node.ctx.fail(f"{key}[{i}]", "must be a non-empty string without spaces")
    return tuple(keys)


def _hosts(top: Node) -> tuple[str, ...]:
    hosts = top.texts("allowedHosts")
    for i, value in enumerate(hosts):
        name = value.strip()
        if not name or any(c.isspace() or c in "/:@" for c in name):
            top.ctx.fail(f"allowedHosts[{i}]", "must be a host name (llm.example.com), a "
                         f"domain with a leading dot (.example.com) or *, got {show(value)}")
    return tuple(h.strip().lower() for h in hosts)


def _origins(top: Node) -> tuple[str, ...]:
    cors = top.child("cors", frozenset({"allowOrigins"}))
    if cors is None or cors.data.get("allowOrigins") is None:
        return ("*",)
    origins = cors.texts("allowOrigins")
    for i, value in enumerate(origins):
        url = urlsplit(value.strip())
        if value.strip() != "*" and not (url.scheme and url.netloc and url.path in ("", "/")):
            cors.ctx.fail(f"cors.allowOrigins[{i}]", "must be * or an origin such as "
                          f"https://chat.example.com, got {show(value)}")
    return tuple(o.strip().rstrip("/") for o in origins)


def _groups(ctx: Ctx, top: Node, models: Mapping[str, ModelConfig]) -> tuple[GroupConfig, ...]:
    sources = [top.child("groups", None)]
    routing = top.child("routing", frozenset({"router", "scheduler"}))
    if router := routing.child("router", frozenset({"use", "settings"})) if routing else None:
        use = (router.text("use") or "group").strip().lower()
        if use not in ("group", "matrix", "memory"):
            ctx.fail(router.key("use"), f"must be group, matrix or memory, got {show(use)}")
        if settings := router.child("settings", frozenset({"groups", "matrix", "memory"})):
            if use == "matrix" and settings.data.get("groups") is not None:
                ctx.warn(settings.key("groups"), "not used: routing.router.use is matrix")
            else:
                sources.append(settings.child("groups", None))
    out: list[GroupConfig] = []
    member_of: dict[str, str] = {}
    for source in filter(None, sources):
        for name, raw in source.data.items():
            if any(g.name == str(name) for g in out):
                ctx.fail(source.key(name), f"group {name} is defined twice")
            node = Node(ctx, raw, source.key(name), frozenset(
                {"swap", "exclusive", "persistent", "members"}))
            members = []
            for i, member in enumerate(node.texts("members")):
                where = f"{node.key('members')}[{i}]"
                if member not in models:
                    ctx.warn(where, f"{show(member)} is not a defined model, ignored")
                    continue
                if member in member_of:
                    ctx.fail(where, f"{show(member)} is already a member of group "
                             f"{member_of[member]}: a model belongs to one group at most")
                member_of[member] = str(name)
                members.append(member)
            out.append(GroupConfig(
                name=str(name), swap=node.flag("swap", True),
                exclusive=node.flag("exclusive", True),
                persistent=node.flag("persistent", False), members=tuple(members),
            ))
    return tuple(out)


def _check_names(ctx_of: Mapping[str, Ctx], models: Mapping[str, ModelConfig]) -> None:
    owner: dict[str, str] = {}
    for model_id, model in models.items():
        for i, alias in enumerate(model.aliases):
            where = f"models.{model_id}.aliases[{i}]"
            if alias in models:
                ctx_of[model_id].fail(where, f"{show(alias)} is already a model id")
            if alias in owner:
                ctx_of[model_id].fail(where, f"{show(alias)} is already an alias of "
                                      f"{owner[alias]}")
            owner[alias] = model_id


def load_config(
    path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None,
    keep_ports: Mapping[str, int] | None = None, config_dir: str | None = None,
) -> LoadResult:
    """Load and validate a config file (llama-swap's format plus swapd's keys).

    Raises ConfigError naming the file and key path; whatever is merely ignored becomes
    a warning in the result. `keep_ports` (a reload: model id → the port it has now) keeps
    each model's ${PORT}, so that a model added or removed before it in file order does
    not renumber it and restart an engine whose recipe did not change.

    In phases: the files' texts (the main file, then what its `include` names), the
    top-level settings, then each model (macros and ports → preset → build, in `_model`),
    then what refers to models (groups, preload).

    `config_dir` is llama-swap's `-config-dir`: its files merge into the main file's
    settings (swapd.config.configdir), each keeping its own models; without `path`, its
    first file is the main one.
    """
    environ = os.environ if environ is None else environ
    warnings: list[str] = []
    extra = config_files(path, config_dir)[1:]
    main = os.fspath(path) if path is not None else config_files(None, config_dir)[0]
    ctx = Ctx(main, environ, warnings)
    data = _read(ctx, main)
    merged: list[tuple[Ctx, Node]] = []
    for file in extra:
        sub = Ctx(file, environ, warnings, label=f"{file}: ")
        more = _read(sub, file)
        entries = more.pop("models", None)
        configdir.merge(sub, data, more)
        merged.append((sub, Node(sub, {"models": entries}, "", frozenset({"models"}))))
    top = Node(ctx, data, "", _TOP_KEYS)
    base = _settings(top, os.path.abspath(main))
    if top.data.get("models") is None and base.include is None and not merged:
        ctx.fail("models", "required: a mapping of model ids to their settings")
    files = [(ctx, top), *merged, *_included(ctx, base)]
    models, ctx_of = _models(files, base, keep_ports or {})
    _check_names(ctx_of, models)
    config = _with_models(top, base, models)
    cluster.check(config, ctx_of, ctx)
    return LoadResult(config=config, warnings=tuple(warnings))


def config_files(path: str | os.PathLike[str] | None, config_dir: str | None) -> list[str]:
    """The files a config is read from: `path`, then the `config_dir` files (llama-swap's
    `-config` and `-config-dir`). Raises ConfigError when there is none, or when `path` is
    also in `config_dir` (llama-swap refuses that too)."""
    files = [os.fspath(path)] if path is not None else []
    if config_dir is not None:
        ctx = Ctx(config_dir, os.environ, [])
        try:
            found = configdir.dir_files(config_dir)
        except OSError as exc:
            ctx.fail("", str(exc))
        if path is not None and os.path.abspath(files[0]) in map(os.path.abspath, found):
            ctx.fail("", f"{path} is also in -config-dir; remove it from one")
        files += found
    if not files:
        raise ConfigError("no config file: give -config FILE, or -config-dir with *.yaml "
                          "files in it", file=config_dir)
    return files


def _settings(top: Node, source: str) -> Config:
    """The top-level keys: a Config without models. A new key is a name in _TOP_KEYS, a
    field of Config and a line here (and one in `swapd check`'s output, swapd.cli)."""
    ctx = top.ctx
    hct = float(top.number("healthCheckTimeout", 120.0, strict=True))
    level = (top.text("logLevel") or "info").strip().lower().replace("warning", "warn")
    if level not in _LOG_LEVELS:
        ctx.fail("logLevel", f"must be one of {', '.join(_LOG_LEVELS)}, got {show(level)}")
    listen = top.text("listen") or "127.0.0.1:28080"
    try:
        split_host_port(listen)  # ":PORT" is every interface, as llama-swap's -listen
    except ValueError:
        ctx.fail("listen", f"must be HOST:PORT or :PORT (e.g. 127.0.0.1:28080), "
                 f"got {show(listen)}")
    state_dir = top.text("stateDir")
    newer = recent.load(top)
    activity = _activity(top)
    api_keys, admin_keys = _keys(top, "apiKeys"), _keys(top, "adminKeys")
    return Config(
        models={},
        listen=listen,
        api_keys=api_keys,
        admin_keys=admin_keys,
        keys=load_keys(top, api_keys, admin_keys, activity.get("activity_size", 1000)),
        state_dir=os.path.expanduser(state_dir) if state_dir else None,
        log_level=level,
        health_check_timeout=hct,
        start_port=top.number("startPort", 5800, minimum=1, maximum=65535, integer=True),
        global_ttl=float(top.number("globalTTL", 0.0)),
        unload_timeout=float(top.number("unloadTimeout", 10.0)),
        include_aliases_in_list=top.flag("includeAliasesInList", False),
        send_loading_state=top.flag("sendLoadingState", False),
        max_queue=top.number("maxQueue", 256, minimum=1, integer=True),
        queue_timeout=float(top.number("queueTimeout", hct + 60, strict=True)),
        shutdown_timeout=float(top.number("shutdownTimeout", 30.0)),
        log_buffer_lines=top.number("logBufferLines", 2000, minimum=1, integer=True),
        max_body_bytes=top.number("maxBodyBytes", 64 * 1024 * 1024, minimum=1, integer=True),
        include=top.text("include") or None,
        allowed_hosts=_hosts(top),
        cors_allow_origins=newer.cors_allowed_origins or _origins(top),
        global_concurrency_limit=newer.global_concurrency_limit,
        llamaswap_metric_names=newer.llamaswap_metric_names,
        body_timeout=float(top.number("bodyTimeout", 60.0, strict=True)),
        header_timeout=float(top.number("headerTimeout", 10.0, strict=True)),
        write_timeout=float(top.number("writeTimeout", 60.0, strict=True)),
        memory_guard=_memory_guard(top),
        source=source,
        loaded_at=time.time(),
        macros=tuple(_macro_defs(ctx, top.child("macros", None)).items()),
        capture_buffer_mb=float(top.number("captureBuffer", 0.0, maximum=4096)),
        **activity,
    )


def _included(ctx: Ctx, base: Config) -> list[tuple[Ctx, Node]]:
    """The files `include` names, read, in load order; each keeps its own error context."""
    if not base.include:
        return []
    out = []
    seen: dict[str, str] = {os.path.realpath(base.source or "."): base.source or ""}
    repeated: set[str] = set()
    for file in include_files(base.source, base.include):
        if os.path.islink(file) and not os.path.exists(file):
            ctx.warn("include", f"{file} is a broken or looping symlink, not loaded")
            continue
        if not os.path.isfile(file):
            continue
        real = os.path.realpath(file)
        if real in seen:
            # A symlinked folder that `**` walks into again, or a link to the main file.
            if os.path.abspath(file) != base.source and real not in repeated:
                repeated.add(real)
                ctx.warn("include", f"{file} is {seen[real]} again (a symlink), loaded once")
            continue
        seen[real] = file
        sub = Ctx(file, ctx.environ, ctx.warnings, label=f"{file}: ")
        out.append((sub, Node(sub, _read(sub, file), "", frozenset({"models"}))))
    return out


def _models(files: list[tuple[Ctx, Node]], base: Config, kept: Mapping[str, int],
            ) -> tuple[dict[str, ModelConfig], dict[str, Ctx]]:
    """Every model of every file, in file order (the main file first: ${PORT} numbers
    follow it), with the file each came from."""
    taken: set[int] = set()
    fresh = iter(range(base.start_port, 1 << 30))

    def port_for(model_id: str) -> int:
        port = kept.get(model_id)
        if port is None or port in taken:
            # Never a port another model holds now: it may still be running on it.
            port = next(p for p in fresh if p not in taken and p not in kept.values())
        taken.add(port)
        return port

    models: dict[str, ModelConfig] = {}
    ctx_of: dict[str, Ctx] = {}
    for where, node in files:
        entries = node.child("models", None)
        for key, raw in entries.data.items() if entries else ():
            model_id = str(key)
            if not model_id.strip():
                where.fail("models", "a model id must not be empty")
            if model_id in models:
                where.fail(f"models.{model_id}",
                           f"defined twice: in {ctx_of[model_id].file} and in {where.file}")
            models[model_id] = _model(where, model_id, raw, base, partial(port_for, model_id))
            ctx_of[model_id] = where
    return models, ctx_of


def _with_models(top: Node, base: Config, models: dict[str, ModelConfig]) -> Config:
    """The last phase: the settings that refer to models (groups, preload, the default
    queueTimeout; llama-swap's routing keys: swapd.config_routing)."""
    ctx = top.ctx
    preload: list[str] = []
    hooks = top.child("hooks", frozenset({"on_startup", "on_request"}))
    startup = hooks.child("on_startup", frozenset({"preload", "profile"})) if hooks else None
    for i, name in enumerate(startup.texts("preload") if startup else []):
        found = replace(base, models=models).resolve(name.strip())
        if found is None:
            ctx.warn(f"hooks.on_startup.preload[{i}]",
                     f"{show(name)} is not a defined model, ignored")
        elif found.cluster_worker:
            ctx.warn(f"hooks.on_startup.preload[{i}]",
                     f"{show(name)} is a cluster worker: only a head's hold starts it, ignored")
        elif found.id not in preload:
            preload.append(found.id)
    queue_timeout = base.queue_timeout
    if top.data.get("queueTimeout") is None:
        # "healthCheckTimeout + 60" with the longest start any model may take (a preset's or
        # the recipe's own), or a request for a cold vLLM would give up while it loads.
        queue_timeout = max(
            [base.health_check_timeout, *(m.health_check_timeout for m in models.values())]
        ) + 60

    groups = _groups(ctx, top, models)
    routing = load(ctx, top, models, groups)
    no_effect(top)
    return replace(base, models=models, groups=groups, preload=tuple(preload),
                   queue_timeout=queue_timeout,
                   startup_profile=recent.startup_profile(top, frozenset(routing.profiles)),
                   **{f.name: getattr(routing, f.name) for f in fields(routing)})


def _activity(top: Node) -> dict[str, Any]:
    """`activity:` (swapd's) and `ui.activity.session_id` (llama-swap's) as Config fields."""
    out: dict[str, Any] = {}
    node = top.child("activity", frozenset({"size", "injectUsage", "store", "retentionDays"}))
    if node is not None:
        out["activity_size"] = node.number("size", 1000, integer=True, maximum=1_000_000)
        out["activity_inject_usage"] = node.flag("injectUsage", False)
        store = node.text("store")
        if store not in (None, "", "memory", "sqlite"):
            top.ctx.fail("activity.store", f"must be memory or sqlite, got {show(store)}")
        out["activity_store"] = store == "sqlite"
        out["activity_retention_days"] = float(node.number("retentionDays", 7.0, strict=True))
    if "activity_size" not in out and top.data.get("metricsMaxInMemory") is not None:
        # llama-swap's name for the same thing: request records kept in memory.
        out["activity_size"] = top.number("metricsMaxInMemory", 1000, minimum=1, integer=True,
                                          maximum=1_000_000)
    ui = top.child("ui", frozenset({"activity"}))
    ui_activity = ui.child("activity", frozenset({"session_id"})) if ui else None
    if ui_activity is not None and ui_activity.data.get("session_id") is not None:
        out["session_headers"] = tuple(h for h in ui_activity.texts("session_id") if h.strip())
    return out


def load_model_entry(model_id: str, data: object, base: Config,
                     environ: Mapping[str, str] | None = None) -> ModelConfig:
    """Validate one recipe (what would stand under `models.{model_id}`) against a loaded
    config, as the admin API must before writing it to disk as `{model_id}.yaml`."""
    ctx = Ctx(None, os.environ if environ is None else environ, [])
    if not valid_id(model_id):
        ctx.fail(f"models.{model_id}", "a recipe id must match "
                 "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$ and not contain '..'")
    used = {m.port for m in base.models.values() if m.id != model_id}

    def free_port() -> int:
        return next(p for p in range(base.start_port, 1 << 30) if p not in used)

    model = _model(ctx, model_id, data, base, free_port)
    others = {k: v for k, v in base.models.items() if k != model_id}
    if owner := next((m.id for m in others.values() if model_id in m.aliases), None):
        ctx.fail(f"models.{model_id}", f"{show(model_id)} is already an alias of {owner}")
    _check_names({k: ctx for k in [*others, model_id]}, {**others, model_id: model})
    return model
