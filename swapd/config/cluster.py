"""One tenant across two nodes (docs/two-sparks.md): a head model's `cluster:`, a worker
recipe's `clusterWorker: true`, and what they refer to in `peers:`.

A head names, per peer, a worker recipe of *that peer's* config; it never sends a command:
a peer only ever runs what its own config says (the hold route takes a model id).
"""

from __future__ import annotations

from collections.abc import Mapping

from swapd.config.nodes import Ctx, Node, show, valid_id
from swapd.config.types import ClusterConfig, Config

# Seconds. Below 1 s a renewal every ttl/3 is a busy loop across a LAN; above 10 minutes a
# head that died would keep the peer's GPU for longer than any client waits.
MIN_HOLD_TTL = 1.0
MAX_HOLD_TTL = 600.0
DEFAULT_HOLD_TTL = 15.0
_CLUSTER_KEYS = frozenset({"nodes", "holdTtl"})


def cluster_of(node: Node) -> ClusterConfig | None:
    """`models.X.cluster`: `{nodes: {PEER: WORKER_ID}, holdTtl}`; None when absent."""
    section = node.child("cluster", _CLUSTER_KEYS)
    if section is None:
        return None
    ctx = section.ctx
    nodes = section.child("nodes", None)
    if nodes is None or not nodes.data:
        ctx.fail(section.key("nodes"), "required: a mapping of peer ids (from peers:) to the "
                 "worker recipe each runs for this model (clusterWorker: true there)")
    pairs: list[tuple[str, str]] = []
    for peer in nodes.data:
        worker = (nodes.text(str(peer)) or "").strip()
        if not valid_id(worker):
            ctx.fail(nodes.key(peer), "must be the id of a worker recipe on that peer "
                     f"(clusterWorker: true there), got {show(worker)[:80]}")
        pairs.append((str(peer), worker))
    ttl = float(section.number("holdTtl", DEFAULT_HOLD_TTL, minimum=MIN_HOLD_TTL,
                               maximum=MAX_HOLD_TTL))
    return ClusterConfig(nodes=tuple(pairs), hold_ttl=ttl)


def check(config: Config, ctx_of: Mapping[str, Ctx], main: Ctx) -> None:
    """What cluster heads refer to: every peer they name is in `peers:`; a peer listed
    without `models` must be a cluster peer. Bad references fail with their key path."""
    named: set[str] = set()
    for model in config.models.values():
        if model.cluster is None:
            continue
        ctx = ctx_of.get(model.id, main)
        for peer, _worker in model.cluster.nodes:
            where = f"models.{model.id}.cluster.nodes.{peer}"
            found = config.peers.get(peer)
            if found is None:
                known = ", ".join(sorted(config.peers)) or "none"
                ctx.fail(where, f"{show(peer)[:80]} is not a peer: name one from peers: "
                         f"(defined: {known})")
            named.add(peer)
            if found.api_key is None and found.api_key_unset is None:
                ctx.warn(where, f"peers.{peer} has no apiKey: its holds are sent without a "
                         "key, which that swapd accepts only when it has no adminKeys and "
                         "this node is its loopback")
    for listed in config.peers.values():
        if not listed.models and listed.id not in named:
            main.fail(f"peers.{listed.id}.models", "required: the models this peer serves "
                      "(or name the peer in a model's cluster.nodes)")
