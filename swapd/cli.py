"""Command line: the only place that exits."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

import yaml

from swapd import __version__
from swapd.config.loader import load_config
from swapd.config.nodes import ConfigError, local_url, spell, split_host_port
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
    # llama-swap's -version too; neither needs a config.
    parser.add_argument("--version", "-version", action="version",
                        version=f"swapd {__version__}")
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the daemon")
    _serve_args(serve)

    check = sub.add_parser("check", help="validate a config and print the resolved models")
    _config_args(check)
    check.add_argument(
        "--strict", action="store_true", help="exit 2 on any warning (for CI and deploy scripts)"
    )

    status = sub.add_parser("status", help="show a running swapd's engines")
    status.add_argument("--url", default=None,
                        help="swapd's base URL (default: from --config's listen, else "
                        "http://127.0.0.1:28080)")
    status.add_argument("--config", "-config", default=None,
                        help="the config swapd runs with: its listen address is the URL")
    status.add_argument("--admin-key", default=None,
                        help="an adminKeys entry (shows in ps: prefer $SWAPD_ADMIN_KEY or "
                        "--admin-key-file)")
    status.add_argument("--admin-key-file", default=None,
                        help="a file holding the key (kept out of the process list); "
                        "default: $SWAPD_ADMIN_KEY, if set")
    status.add_argument("--json", action="store_true", help="print the raw JSON")

    litellm = sub.add_parser("litellm-config", help="print a LiteLLM model_list for this node")
    litellm.add_argument("--config", "-config", required=True)
    litellm.add_argument("--url", default=None, help="this node's swapd URL as LiteLLM sees it")
    return parser


def _config_args(parser: argparse.ArgumentParser) -> None:
    # llama-swap spells its flags with one dash (-config, -listen): accept both.
    parser.add_argument("--config", "-config", default=None, help="config file (YAML)")
    parser.add_argument(
        "--config-dir", "-config-dir", default=None,
        help="a folder of *.yml/*.yaml files merged into the config, by file name "
        "(llama-swap's -config-dir)")


def _serve_args(parser: argparse.ArgumentParser) -> None:
    _config_args(parser)
    parser.add_argument("--listen", "-listen", default=None,
                        help="HOST:PORT, or :PORT for every interface (overrides config)")
    parser.add_argument(
        "--watch-config", "-watch-config", action="store_true", help="reload when the file changes"
    )
    parser.add_argument("--tls-cert-file", "-tls-cert-file", default=None,
                        help="serve HTTPS with this certificate (PEM; with --tls-key-file)")
    parser.add_argument("--tls-key-file", "-tls-key-file", default=None,
                        help="the certificate's private key (PEM)")


def _load(path: str | None, config_dir: str | None = None) -> LoadResult | None:
    if path is None and config_dir is None:
        print("swapd: give --config FILE (or --config-dir FOLDER)", file=sys.stderr)
        return None
    try:
        return load_config(path, config_dir=config_dir)
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
        and args_list[0] not in ("-h", "--help", "--version", "-version")
    ):
        # Drop-in for llama-swap: `swapd --config FILE` means `swapd serve --config FILE`.
        args_list.insert(0, "serve")
    parser = _parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_CONFIG

    if args.command == "check":
        loaded = _load(args.config, args.config_dir)
        if loaded is None:
            return EXIT_BAD_CONFIG
        loaded = _with_exec_warnings(loaded)
        print(format_check(loaded))
        if args.strict and loaded.warnings:
            print(f"swapd: {len(loaded.warnings)} warning(s) and --strict", file=sys.stderr)
            return EXIT_BAD_CONFIG
        return EXIT_OK

    if args.command == "serve":
        if (args.tls_cert_file is None) != (args.tls_key_file is None):
            print("swapd: --tls-cert-file and --tls-key-file go together", file=sys.stderr)
            return EXIT_BAD_CONFIG
        loaded = _load(args.config, args.config_dir)
        if loaded is None:
            return EXIT_BAD_CONFIG
        loaded = _with_exec_warnings(loaded)  # logged at startup, with the other warnings
        if args.listen is not None:
            try:
                split_host_port(args.listen)
            except ValueError as exc:
                print(f"swapd: --listen: {exc}", file=sys.stderr)
                return EXIT_BAD_CONFIG
        from swapd.app import serve, tls_context

        tls = None
        if args.tls_cert_file is not None:
            try:
                tls = tls_context(args.tls_cert_file, args.tls_key_file)
            except (OSError, ValueError) as exc:
                print(f"swapd: TLS: {exc}", file=sys.stderr)
                return EXIT_BAD_CONFIG
        return serve(args.config, loaded, args.listen, args.watch_config, tls=tls,
                     config_dir=args.config_dir)

    if args.command == "status":
        return _status_command(args)

    if args.command == "litellm-config":
        return _litellm(args.config, args.url)
    return EXIT_BAD_CONFIG


class _Unset(dict[str, str]):
    """os.environ, where an unset variable reads as a stand-in: `litellm-config` writes only
    the names of the variables, never their values."""

    def __contains__(self, name: object) -> bool:
        return True

    def __missing__(self, name: str) -> str:
        return f"unset-{name}"


def _litellm(path: str, url: str | None) -> int:
    from swapd.litellm import key_env_name, litellm_config

    try:
        loaded = load_config(path, _Unset(os.environ))
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except (ConfigError, OSError, yaml.YAMLError) as exc:
        print(f"swapd: bad config: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    keys = raw.get("apiKeys") if isinstance(raw, dict) else None
    print(litellm_config(loaded.config, url, key_env_name(keys)), end="")
    return EXIT_OK


def _status_command(args: argparse.Namespace) -> int:
    """`swapd status`: the URL from --url, else from --config's listen; the admin key from
    --admin-key-file, else $SWAPD_ADMIN_KEY, else --admin-key (which every local user sees
    in `ps`: said so)."""
    url = args.url
    if url is None and args.config is not None:
        loaded = _load(args.config)
        if loaded is None:
            return EXIT_BAD_CONFIG
        url = local_url(loaded.config.listen)
    key = os.environ.get("SWAPD_ADMIN_KEY", "").strip() or None
    if key is None and args.admin_key:
        print("swapd: warning: --admin-key shows the key to every local user (ps, "
              "/proc/PID/cmdline); use $SWAPD_ADMIN_KEY or --admin-key-file", file=sys.stderr)
        key = args.admin_key
    if args.admin_key_file is not None:
        try:
            with open(args.admin_key_file, encoding="utf-8") as f:
                key = f.read().strip()
        except OSError as exc:
            print(f"swapd: --admin-key-file: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_BAD_CONFIG
    return _status(url or "http://127.0.0.1:28080", key, args.json)


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
