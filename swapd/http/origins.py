"""Which browsers may talk to swapd: the `Host` a request names (DNS rebinding), the
`Origin` it comes from (cross-site requests that change state) and CORS on the inference
routes. Pure functions of headers and config; the app's middleware applies them.

A browser is a loopback client: a page on any site can make it send requests to
127.0.0.1:28080 (a form post, an <img>, fetch() in no-cors mode), and with DNS rebinding a
page on `attacker.example` can even read the answers, because to the browser they come from
its own origin. So, as Jupyter and Vite do:
- a `Host` must be an IP address, a loopback name, a name of one label (`swapd`), this
  machine's own names or a name the operator listed in `allowedHosts` (a rebinding attack
  needs a name in public DNS that the attacker controls);
- operations and admin routes refuse a request whose `Origin` (or `Sec-Fetch-Site`) says a
  page of another origin sent it;
- CORS is answered on the inference routes only, for the origins in `cors.allowOrigins`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from multidict import CIMultiDictProxy

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
DEFAULT_PORTS = {"http": 80, "https": 443}
# Preflight answers may be cached this long by the browser (llama-swap sends the same).
PREFLIGHT_MAX_AGE = "86400"
PREFLIGHT_HEADERS = "Content-Type, Authorization, Accept, X-Requested-With, x-api-key"


def own_names() -> frozenset[str]:
    """This machine's names (`spark-1a2b`, `spark-1a2b.lan`): LAN clients call it by them."""
    host = socket.gethostname()
    names = {host, f"{host.split('.')[0]}.local"}  # .local: its mDNS name
    try:
        names.add(socket.getfqdn())
    except OSError:
        pass
    return frozenset(n.lower().rstrip(".") for n in names if n)


def split_host(host: str) -> tuple[str, int | None] | None:
    """`Host` header → (lower-case name or address, port); None when it is malformed."""
    host = host.strip()
    if host.startswith("["):
        name, sep, rest = host[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:]
    elif host.count(":") > 1:
        return None  # an IPv6 address must be bracketed in a Host header
    else:
        name, _, port_text = host.partition(":")
    port: int | None = None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return None
        port = int(port_text)
    name = name.lower().rstrip(".")
    if not name or any(c.isspace() or c in "/@\\?#" for c in name):
        return None
    return name, port


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%")[0])
    except ValueError:
        return False
    return True


def host_allowed(host: str | None, allowed: Iterable[str], own: Iterable[str]) -> bool:
    """True for a `Host` that no rebinding attack can produce (see the module docstring).

    `allowed` holds names (`llm.example.com`), domains with a leading dot (`.example.com`:
    it and every name below it) or `*` (any Host: the operator turns the check off).
    """
    if host is None:
        return True  # HTTP/1.0 without Host: not a browser
    parts = split_host(host)
    if parts is None:
        return False
    name = parts[0]
    if _is_ip(name) or name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    if "." not in name:
        # A name of one label (`swapd` in docker compose, `spark-1a2b`) cannot be
        # registered in public DNS, so no attacker's page can rebind it.
        return True
    if name in own:
        return True
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry == "*" or entry == name:
            return True
        if entry.startswith(".") and (name == entry[1:] or name.endswith(entry)):
            return True
    return False


def same_origin(origin: str, host: str | None) -> bool:
    """True when `origin` (scheme://name[:port]) names the server the `Host` header names."""
    if host is None:
        return False
    try:
        url = urlsplit(origin)
        origin_port = url.port or DEFAULT_PORTS.get(url.scheme)
    except ValueError:
        return False
    if url.scheme not in DEFAULT_PORTS or not url.hostname:
        return False
    parts = split_host(host)
    if parts is None:
        return False
    name, port = parts
    if url.hostname.lower().rstrip(".") != name:
        return False
    # Behind a TLS proxy the Host may carry no port while the Origin says https (443).
    return port is None or port == origin_port


def foreign_origin(headers: CIMultiDictProxy[str], host: str | None) -> str | None:
    """Why a request to an operations route looks sent by another site's page, else None.

    `Origin` is sent by browsers on every POST/PUT/DELETE and on cross-origin fetches;
    `Sec-Fetch-Site` also on the GETs an <img> or a link makes (which carry no Origin).
    Clients that are not browsers (curl, SDKs, `swapd status`) send neither.
    """
    origin = headers.get("Origin")
    if origin is not None:
        if same_origin(origin, host):
            return None
        return f"requests from origin {origin[:200]!r} may not use this route"
    site = headers.get("Sec-Fetch-Site", "").strip().lower()
    if site in ("cross-site", "same-site"):
        return f"requests from another site (Sec-Fetch-Site: {site}) may not use this route"
    return None


def cors_allow(origin: str | None, allow_origins: Iterable[str]) -> str | None:
    """The `Access-Control-Allow-Origin` value for a request from `origin`, None if refused."""
    if origin is None:
        return None
    for entry in allow_origins:
        if entry == "*":
            return "*"
        if entry.rstrip("/").lower() == origin.lower():
            return origin
    return None


def preflight_headers(allow: str, requested_headers: str | None) -> dict[str, str]:
    """Headers of a 204 answer to an allowed CORS preflight."""
    headers = {
        "Access-Control-Allow-Origin": allow,
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": _header_list(requested_headers) or PREFLIGHT_HEADERS,
        "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
    }
    if allow != "*":
        headers["Vary"] = "Origin"
    return headers


def _header_list(requested: str | None) -> str:
    """The header names a preflight asks for, kept only if they are plain tokens."""
    if not requested:
        return ""
    names = [n.strip() for n in requested.split(",")]
    ok = [n for n in names if n and len(n) < 100 and all(c.isalnum() or c in "-_" for c in n)]
    return ", ".join(ok[:50])
