"""llama-swap's keys added after v250 (issue 22 item 8), each with llama-swap's meaning or
one warning that says why it changes nothing here (docs/llama-swap.md):

- `globalConcurrencyLimit`: inference requests served at once over every model; past it,
  429 at once (no queue), as llama-swap.
- `security.cors.allowedOrigins`: swapd's `cors.allowOrigins` (inference routes only; swapd
  never opens its operations routes to other origins). The other `security.cors` keys warn.
- `store.captureDir`, `store.captureMaxMB`: warn (captures stay in memory, `captureBuffer`).
- `hooks.on_startup.profile`: the profile active at startup and after every reload.
- `policies`, `hooks.on_request`, `models.*.filters.policy`, `peers.*.filters.policy`:
  llama-swap's Swap Policy Language; swapd does not run it, and says so per program (a
  `deny` there refuses nothing here).
- `metrics.llamaSwapNames`: also export llama-swap's `llamaswap_*` series (swapd.observe.
  metrics).
- `models.*.swappable` is read with the model's other keys (swapd.config.loader).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from swapd.config.nodes import Node, show

TOP_KEYS = frozenset({"globalConcurrencyLimit", "security", "policies", "metrics"})

_SPL = ("swapd does not run llama-swap's Swap Policy Language: requests pass without this "
        "program's rules (a deny here refuses nothing); use filters.stripParams/setParams, "
        "or keys per client (docs/llama-swap.md)")
_CORS_OTHER = {
    "allowCredentials": "swapd sends no Access-Control-Allow-Credentials: browsers call its "
                        "inference API with an API key header, not cookies",
    "allowedMethods": "swapd answers preflights with GET, POST, OPTIONS (its inference API)",
    "allowedHeaders": "swapd echoes the headers a preflight asks for (plain tokens only)",
    "exposedHeaders": "swapd exposes no extra response headers to other origins",
    "maxAge": "swapd's preflight answers carry its own Access-Control-Max-Age",
}


@dataclass(frozen=True)
class Recent:
    """What these keys give the Config (its fields of the same names)."""

    global_concurrency_limit: int = 0
    startup_profile: str | None = None
    llamaswap_metric_names: bool = False
    # security.cors.allowedOrigins, when cors.allowOrigins (swapd's) is absent.
    cors_allowed_origins: tuple[str, ...] | None = None


def load(top: Node) -> Recent:
    ctx = top.ctx
    limit = top.number("globalConcurrencyLimit", 0, integer=True)
    metrics = top.child("metrics", frozenset({"llamaSwapNames"}))
    names = metrics.flag("llamaSwapNames", False) if metrics else False
    origins = _security(top)
    policies = top.child("policies", None)
    for name in policies.data if policies else ():
        ctx.warn(policies.key(name) if policies else "policies", _SPL)
    hooks = top.data.get("hooks")
    if isinstance(hooks, dict) and hooks.get("on_request") is not None:
        ctx.warn("hooks.on_request", _SPL)
    _store(top)
    return Recent(global_concurrency_limit=limit, llamaswap_metric_names=names,
                  cors_allowed_origins=origins)


def startup_profile(top: Node, profiles: frozenset[str]) -> str | None:
    """`hooks.on_startup.profile`: a defined profile, or None (an undefined one is a
    warning, as every dangling reference is in swapd; llama-swap refuses the file)."""
    hooks = top.data.get("hooks")
    startup = hooks.get("on_startup") if isinstance(hooks, dict) else None
    raw = startup.get("profile") if isinstance(startup, dict) else None
    if raw is None:
        return None
    name = top.ctx.text(raw, "hooks.on_startup.profile") or ""
    if name not in profiles:
        top.ctx.warn("hooks.on_startup.profile",
                     f"{show(name)} is not a defined profile, ignored")
        return None
    return name


def filter_policy(filters: Node | None) -> None:
    """`filters.policy` of a model or a peer: one warning."""
    if filters is not None and filters.data.get("policy") is not None:
        filters.ctx.warn(filters.key("policy"), _SPL)


def _security(top: Node) -> tuple[str, ...] | None:
    security = top.child("security", frozenset({"cors"}))
    cors = security.child("cors", frozenset({"allowedOrigins", *_CORS_OTHER})) \
        if security else None
    if cors is None:
        return None
    for key, why in _CORS_OTHER.items():
        if cors.data.get(key) is not None:
            cors.ctx.warn(cors.key(key), why)
    if cors.data.get("allowedOrigins") is None:
        return None
    origins = cors.texts("allowedOrigins")
    for i, value in enumerate(origins):
        url = urlsplit(value.strip())
        # llama-swap refuses a path or a trailing slash: a browser never sends one.
        if value.strip() != "*" and not (url.scheme and url.netloc and url.path == ""):
            cors.ctx.fail(f"{cors.key('allowedOrigins')}[{i}]", "must be * or a bare origin "
                          f"such as https://chat.example.com, got {show(value)}")
    if top.data.get("cors") is not None:
        top.ctx.warn(cors.key("allowedOrigins"), "cors.allowOrigins is set too and wins")
        return None
    return tuple(o.strip() for o in origins)


def _store(top: Node) -> None:
    store = top.data.get("store")
    if not isinstance(store, dict):
        return
    for key in ("captureDir", "captureMaxMB"):
        if store.get(key) is not None:
            top.ctx.warn(f"store.{key}", "swapd keeps request captures in memory only "
                         "(captureBuffer, shown in /ui); none are written to disk")
