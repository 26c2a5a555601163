"""Command line: the only place that exits."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import secrets
import shlex
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import yaml

from swapd import __version__
from swapd.config.keys import KEY_NAME, digest
from swapd.config.loader import load_config
from swapd.config.nodes import ConfigError, local_url, spell, split_host_port
from swapd.config.routing import check_lines
from swapd.config.sizes import format_size
from swapd.config.types import Config, KeyConfig, KeyRole, LoadResult, RouterKind
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

    keys = sub.add_parser("keys", help="make a named key, or list the config's keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="print a fresh key once, and its YAML to paste")
    new.add_argument("name", help="the key's name (labels its usage and metrics)")
    new.add_argument("--models", nargs="+", default=None,
                     help="model ids, aliases or globs it may use (default: all)")
    new.add_argument("--peers", nargs="+", default=None,
                     help="peer ids or peer/model globs it may reach (default: all)")
    new.add_argument("--role", choices=[r.value for r in KeyRole], default="inference")
    new.add_argument("--max-concurrent", type=int, default=0)
    new.add_argument("--requests-per-minute", type=int, default=0)
    new.add_argument("--tokens-per-day", type=int, default=0)
    new.add_argument("--expires", default=None, help="a date (2027-01-01)")
    new.add_argument("--no-swap", action="store_true",
                     help="only models already running (it never starts or swaps one)")
    listing = keys_sub.add_parser("list", help="the config's keys and today's usage")
    listing.add_argument("--config", "-config", required=True)
    listing.add_argument("--url", default=None, help="swapd's base URL (default: its listen)")
    listing.add_argument("--key", default=None,
                         help="an operator or admin key, if the config has such keys "
                         "(default: $SWAPD_KEY)")

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
    commands = {"serve", "check", "status", "keys", "litellm-config"}
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

    if args.command == "keys":
        if args.keys_command == "new":
            return _keys_new(args)
        loaded = _load(args.config)
        if loaded is None:
            return EXIT_BAD_CONFIG
        return _keys_list(loaded.config, args.url, args.key or os.environ.get("SWAPD_KEY"))

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
        f"bodyTimeout: {spell(config.body_timeout)}s, writeTimeout: "
        f"{spell(config.write_timeout)}s, headerTimeout: {spell(config.header_timeout)}s",
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
        if m.cluster is not None:
            nodes = ", ".join(f"{peer}: {worker}" for peer, worker in m.cluster.nodes)
            lines.append(f"    cluster:  holds {nodes} before it starts; renewed every "
                         f"{spell(round(m.cluster.hold_ttl / 3, 3))}s, holdTtl "
                         f"{spell(m.cluster.hold_ttl)}s (docs/two-sparks.md)")
        if m.cluster_worker:
            lines.append("    cluster:  a worker: started only by a head's hold, never by a "
                         "request")
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
    named = [k for k in config.keys.values() if k.named]
    if named:
        lines.append(f"keys: {len(named)} named (docs/keys.md)")
        for key in named:
            lines.append(f"  {key.name}: role {key.role}, models {_scope(key.models)}, "
                         f"peers {_scope(key.peers)}, limits {_limits(key)}")
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
    lines += _cluster_lines(models)
    return "\n".join(lines)


def _cluster_lines(models: dict[str, Any]) -> list[str]:
    """A cluster head's nodes and each worker's hold; a worker's holder (docs/two-sparks.md)."""
    lines = []
    for model, info in models.items():
        cluster = info.get("cluster")
        if not isinstance(cluster, dict):
            continue
        if cluster.get("role") == "head":
            for node in cluster.get("nodes") or []:
                error = f" ({node['error']})" if node.get("error") else ""
                lines.append(f"{model}: node {node.get('peer')}: worker {node.get('worker')} "
                             f"{node.get('state')}{error}")
        elif isinstance(hold := cluster.get("hold"), dict):
            expires = hold.get("expires_in")
            lines.append(f"{model}: held for {hold.get('holder')} (hold {hold.get('id')}, "
                         + ("starting" if expires is None else f"expires in {expires:g}s")
                         + ")")
        else:
            lines.append(f"{model}: cluster worker, not held")
    return lines


# -- keys ------------------------------------------------------------------------------


def _keys_new(args: argparse.Namespace) -> int:
    """A fresh key, printed once (only its SHA-256 goes in the config), and its entry."""
    import yaml

    if not KEY_NAME.fullmatch(args.name):
        print("swapd: a key's name must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
              file=sys.stderr)
        return EXIT_BAD_CONFIG
    numbers = (args.max_concurrent, args.requests_per_minute, args.tokens_per_day)
    if any(n < 0 for n in numbers):
        print("swapd: limits must be integers ≥ 0", file=sys.stderr)
        return EXIT_BAD_CONFIG
    secret = "sk-swapd-" + secrets.token_urlsafe(32)
    entry: dict[str, object] = {"keySha256": digest(secret).hex()}
    if args.models is not None:
        entry["models"] = [m for arg in args.models for m in arg.split(",") if m]
    if args.peers is not None:
        entry["peers"] = [p for arg in args.peers for p in arg.split(",") if p]
    entry["role"] = args.role
    for name, value in (("maxConcurrent", args.max_concurrent),
                        ("requestsPerMinute", args.requests_per_minute),
                        ("tokensPerDay", args.tokens_per_day)):
        if value:
            entry[name] = value
    if args.expires:
        entry["expires"] = args.expires
    if args.no_swap:
        entry["swap"] = False
    print(f"key for {args.name} (shown once; swapd keeps only its SHA-256):\n\n  {secret}\n")
    print("paste under `keys:` in the config:\n")
    print(yaml.safe_dump({"keys": {args.name: entry}}, sort_keys=False,
                         default_flow_style=None).rstrip())
    return EXIT_OK


def _scope(globs: tuple[str, ...] | None) -> str:
    return "all" if globs is None else ", ".join(globs) or "none"


def _limits(key: KeyConfig) -> str:
    parts = []
    if key.max_concurrent:
        parts.append(f"{key.max_concurrent} at once")
    if key.requests_per_minute:
        parts.append(f"{key.requests_per_minute}/min")
    if key.tokens_per_day:
        parts.append(f"{key.tokens_per_day} tokens/day")
    if not key.swap:
        parts.append("no swap")
    return ", ".join(parts) or "-"


def format_keys(config: Config, usage: dict[str, dict[str, object]] | None,
                now: float) -> str:
    """`swapd keys list`: one row per key (named, then the old lists' unnamed ones)."""
    header = ("NAME", "ROLE", "MODELS", "PEERS", "LIMITS", "EXPIRES", "TODAY")
    rows = [header]
    for key in sorted(config.keys.values(), key=lambda k: (not k.named, k.name)):
        expires = "-"
        if key.expires is not None:
            expires = time.strftime("%Y-%m-%d", time.gmtime(key.expires))
            if key.expires <= now:
                expires += " (expired)"
        today = "?"
        if usage is not None:
            row = usage.get(key.name, {})
            today = f"{row.get('requests', 0)} req, {row.get('tokens', 0)} tok"
            if key.tokens_per_day:
                today += f" of {key.tokens_per_day}"
        rows.append((key.name, str(key.role), _scope(key.models), _scope(key.peers),
                     _limits(key), expires, today))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _keys_list(config: Config, url: str | None, key: str | None) -> int:
    if not config.keys:
        print("no keys in this config (keys:, apiKeys, adminKeys)")
        return EXIT_OK
    if url is None:
        host, port = split_host_port(config.listen)
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    request = urllib.request.Request(url.rstrip("/") + "/api/usage?by=key")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    usage: dict[str, dict[str, object]] | None = None
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            usage = {str(row["name"]): row for row in json.load(resp)["data"]}
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
        print(redact_text(f"swapd: cannot read today's usage from {url}/api/usage: {exc}"),
              file=sys.stderr)
    print(format_keys(config, usage, time.time()))
    return EXIT_OK if usage is not None else 1
