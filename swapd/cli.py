"""Command line: the only place that exits."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from swapd import __version__
from swapd.config.loader import load_config
from swapd.config.nodes import ConfigError, spell, split_host_port
from swapd.config.routing import check_lines
from swapd.config.sizes import format_size
from swapd.config.types import LoadResult, RouterKind
from swapd.redact import redact_argv, redact_text

EXIT_OK = 0
EXIT_BAD_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swapd",
        description="One OpenAI endpoint that starts, swaps and evicts inference engines.",
    )
    parser.add_argument("--version", action="version", version=f"swapd {__version__}")
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the daemon")
    _serve_args(serve)

    check = sub.add_parser("check", help="validate a config and print the resolved models")
    check.add_argument("--config", "-config", required=True, help="config file (YAML)")
    check.add_argument(
        "--strict", action="store_true", help="exit 2 on any warning (for CI and deploy scripts)"
    )

    status = sub.add_parser("status", help="show a running swapd's engines")
    status.add_argument("--url", default="http://127.0.0.1:28080", help="swapd's base URL")
    status.add_argument("--admin-key", default=None, help="an adminKeys entry, if set")
    status.add_argument("--json", action="store_true", help="print the raw JSON")

    litellm = sub.add_parser("litellm-config", help="print a LiteLLM model_list for this node")
    litellm.add_argument("--config", "-config", required=True)
    litellm.add_argument("--url", default=None, help="this node's swapd URL as LiteLLM sees it")
    return parser


def _serve_args(parser: argparse.ArgumentParser) -> None:
    # llama-swap spells its flags with one dash (-config, -listen): accept both.
    parser.add_argument("--config", "-config", required=True, help="config file (YAML)")
    parser.add_argument("--listen", "-listen", default=None, help="HOST:PORT (overrides config)")
    parser.add_argument(
        "--watch-config", "-watch-config", action="store_true", help="reload when the file changes"
    )


def _load(path: str) -> LoadResult | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"swapd: bad config: {exc}", file=sys.stderr)
        return None


def _with_exec_warnings(loaded: LoadResult) -> LoadResult:
    """`loaded` plus a warning for each command that could not be exec'd here, with this
    process's environment: the one `swapd serve` started the same way would give engines."""
    from swapd.engines.launch import engine_environment, exec_problem

    found = []
    for model in loaded.config.models.values():
        env = engine_environment(model)
        for key, argv in (("cmd", model.cmd), ("cmdStop", model.cmd_stop)):
            problem = exec_problem(argv, env) if argv else None
            if problem:
                found.append(f"models.{model.id}.{key}: {problem}; the engine cannot start"
                             if key == "cmd" else f"models.{model.id}.{key}: {problem}")
    return dataclasses.replace(loaded, warnings=(*loaded.warnings, *found))


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    commands = {"serve", "check", "status", "litellm-config"}
    if (
        args_list
        and args_list[0] not in commands
        and args_list[0] not in ("-h", "--help", "--version")
    ):
        # Drop-in for llama-swap: `swapd --config FILE` means `swapd serve --config FILE`.
        args_list.insert(0, "serve")
    parser = _parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_CONFIG

    if args.command == "check":
        loaded = _load(args.config)
        if loaded is None:
            return EXIT_BAD_CONFIG
        loaded = _with_exec_warnings(loaded)
        print(format_check(loaded))
        if args.strict and loaded.warnings:
            print(f"swapd: {len(loaded.warnings)} warning(s) and --strict", file=sys.stderr)
            return EXIT_BAD_CONFIG
        return EXIT_OK

    if args.command == "serve":
        loaded = _load(args.config)
        if loaded is None:
            return EXIT_BAD_CONFIG
        loaded = _with_exec_warnings(loaded)  # logged at startup, with the other warnings
        if args.listen is not None:
            try:
                split_host_port(args.listen)
            except ValueError as exc:
                print(f"swapd: --listen: {exc}", file=sys.stderr)
                return EXIT_BAD_CONFIG
        from swapd.app import serve

        return serve(args.config, loaded, args.listen, args.watch_config)

    if args.command == "status":
        return _status(args.url, args.admin_key, args.json)

    if args.command == "litellm-config":
        loaded = _load(args.config)
        if loaded is None:
            return EXIT_BAD_CONFIG
        from swapd.litellm import litellm_config

        print(litellm_config(loaded.config, args.url), end="")
        return EXIT_OK
    return EXIT_BAD_CONFIG


def format_check(result: LoadResult) -> str:
    """What `swapd check` prints: the resolved models, the groups, every warning."""
    config = result.config
    lines = [
        f"config: {config.source}", f"listen: {config.listen}",
        "allowedHosts: IP addresses, localhost, this machine's names"
        + "".join(f", {h}" for h in config.allowed_hosts),
        f"cors.allowOrigins: {', '.join(config.cors_allow_origins) or '- (none)'}",
        f"bodyTimeout: {spell(config.body_timeout)}s, writeTimeout: {spell(config.write_timeout)}s",
        f"models: {len(config.models)}",
    ]
    for m in config.models.values():
        ready = f"GET {m.check_endpoint}" if m.check_endpoint else "port open"
        lines += [
            f"  {m.id}",
            f"    aliases:  {', '.join(m.aliases) or '-'}",
            f"    argv:     {shlex.join(redact_argv(m.cmd))}",
            f"    upstream: {redact_text(m.proxy)} (ready: {ready})",
            f"    ttl:      {spell(m.ttl) + 's' if m.ttl else '0 (never unloaded)'}",
            f"    engine:   {m.engine.value + ' (preset defaults)' if m.engine else '-'}",
            f"    gpu:      {'yes' if m.gpu else 'no'}",
            f"    memory:   {format_size(m.memory) if m.memory else 'learned while it runs'}",
            f"    start:    ready within {spell(m.health_check_timeout)}s (healthCheckTimeout)",
        ]
        stop = "cmdStop" if m.cmd_stop else "SIGTERM to the process group"
        if m.unload_request:
            stop = f"POST {m.unload_request[0]} (unload), then {stop}"
        lines.append(f"    stop:     {stop}; SIGKILL after {spell(m.unload_timeout)}s "
                     "(unloadTimeout)")
        if m.cmd_stop:
            lines.append(f"    cmdStop:  {shlex.join(redact_argv(m.cmd_stop))}")
        if m.sleep is not None:
            calls = ", ".join(f"{c.method} {c.path}" for c in m.sleep.sleep)
            wakes = ", ".join(f"{c.method} {c.path}" for c in m.sleep.wake)
            need = (format_size(m.sleep.min_freed) if m.sleep.min_freed is not None
                    else f"{spell(m.sleep.min_freed_percent)}% of the footprint")
            ttl = f"{spell(m.sleep.ttl)}s" if m.sleep.ttl else "while memory allows"
            lines += [f"    sleep:    {calls} instead of a stop on a swap or ttl; "
                      f"≥ {need} freed within {spell(m.sleep.timeout)}s; kept {ttl}",
                      f"    wake:     {wakes}, then the readiness check"]
        if m.forward_client_auth:
            lines.append("    auth:     the client's Authorization / x-api-key reach the engine "
                         "(forwardClientAuth)")
        if m.env or m.env_remove:  # names only: values may be secrets
            names = [name for name, _ in m.env]
            dropped = [name for name in m.env_remove if name not in names]
            lines.append(f"    env:      {', '.join(names) or '-'}" + (
                f" (not inherited: {', '.join(dropped)})" if dropped else ""))
    if config.router == RouterKind.MEMORY:
        lines.append(f"router: memory (reserve {format_size(config.memory_reserve)})")
    guard = config.memory_guard
    lines.append(f"memoryGuard: floor {guard.floor}" if guard.enabled else "memoryGuard: off")
    lines.append(f"groups: {len(config.groups)}")
    for g in config.groups:
        lines.append(
            f"  {g.name}: swap={spell(g.swap)} exclusive={spell(g.exclusive)} "
            f"persistent={spell(g.persistent)} members={', '.join(g.members) or '-'}"
        )
    if config.preload:
        lines.append(f"preload: {', '.join(config.preload)}")
    lines += check_lines(config)  # matrix, priority, selectors, profiles, peers
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


def _status(url: str, admin_key: str | None, raw: bool) -> int:
    request = urllib.request.Request(url.rstrip("/") + "/status")
    if admin_key:
        request.add_header("Authorization", f"Bearer {admin_key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            doc = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(redact_text(f"swapd: cannot read {url}/status: {exc}"), file=sys.stderr)
        return 1
    if raw:
        # An older swapd may not mask its answer: mask it here too.
        print(redact_text(json.dumps(doc, indent=2)))
        return EXIT_OK
    print(redact_text(format_status(doc)))
    return EXIT_OK


# Engine states in which a process runs: its last exit belongs to an earlier run.
_RUNNING = ("starting", "ready", "stopping", "sleeping", "waking")


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _last_stop(last: object, now: float) -> str:
    """'swap (SIGTERM) 3m ago', 'crash (exit 1) 12s ago': why and how an engine last ended."""
    if not isinstance(last, dict):
        return "-"
    code = last.get("code")
    how = last.get("signal") or (f"exit {code}" if code is not None else "exit ?")
    reason = str(last.get("reason") or "exit").replace("_", " ")
    at = last.get("at")
    age = f" {_ago(now - at)} ago" if isinstance(at, (int, float)) else ""
    return f"{reason} ({how}){age}"


def _failures(failure: object) -> str:
    """'3, retry in 12s': crashes or failed starts in a row, and when the next try is."""
    if not isinstance(failure, dict) or not failure.get("count"):
        return "-"
    retry_in = failure.get("retry_in")
    when = f"retry in {_ago(retry_in)}" if isinstance(retry_in, (int, float)) and retry_in > 0 \
        else "retry on the next request"
    return f"{failure['count']}, {when}"


def format_status(doc: dict[str, object], now: float | None = None) -> str:
    """`/status` as a table a person reads at a glance."""
    now = time.time() if now is None else now
    models = doc.get("models")
    assert isinstance(models, dict)
    tenant = doc.get("tenant") or []
    assert isinstance(tenant, list)
    lines = [
        f"swapd {doc.get('version')} on {doc.get('listen')}   tenant: "
        f"{', '.join(map(str, tenant)) or 'none'}   queued: {doc.get('queue')}",
        "",
    ]
    header = ("MODEL", "STATE", "PID", "UPTIME", "INFLIGHT", "QUEUED", "FAILURES", "LAST STOP")
    rows = [header]
    for model, info in models.items():
        uptime = info.get("uptime")
        state = str(info.get("state"))
        failure = info.get("failure")
        rows.append(
            (
                str(model),
                state,
                str(info.get("pid") or "-"),
                _ago(uptime) if isinstance(uptime, (int, float)) else "-",
                str(info.get("inflight", 0)),
                str(info.get("queued", 0)),
                _failures(failure),
                # A running engine's last exit is an earlier run's: not beside a live pid.
                "-" if state in _RUNNING else _last_stop(info.get("last_exit"), now),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    failures = [(m, i["failure"]) for m, i in models.items() if isinstance(i.get("failure"), dict)]
    for model, failure in failures:
        count = failure.get("count")
        retry_in = failure.get("retry_in")
        when = (f"next try in {math.ceil(retry_in)}s" if isinstance(retry_in, (int, float))
                else "next request tries again")
        lines.append(f"{model}: failed {count} time{'s' if count != 1 else ''}, {when}: "
                     f"{failure.get('reason')}")
    for model, info in models.items():
        sleep = info.get("sleep")
        if isinstance(sleep, dict) and sleep.get("off"):
            lines.append(f"{model}: sleep off: {sleep['off']}")
    return "\n".join(lines)
