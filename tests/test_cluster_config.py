"""`cluster:` and `clusterWorker:` in the config (issue 24): what loads, and what fails with
its key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from swapd.config.loader import load_config
from swapd.config.nodes import ConfigError
from swapd.config.types import LoadResult


def load(tmp_path: Path, data: dict[str, Any], env: dict[str, str] | None = None) -> LoadResult:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, env or {})


def head(**cluster: Any) -> dict[str, Any]:
    return {"peers": {"spark2": {"proxy": "http://spark2:28080", "apiKey": "${env.K}"}},
            "models": {"big": {"cmd": "head ${PORT}", "cluster": cluster}}}


def fails(tmp_path: Path, data: dict[str, Any], where: str) -> str:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, data, {"K": "secret"})
    assert err.value.key_path == where, str(err.value)
    return str(err.value)


def test_a_head_and_a_worker_load(tmp_path: Path) -> None:
    loaded = load(tmp_path, head(nodes={"spark2": "big-worker"}, holdTtl=9), {"K": "k"})
    big = loaded.config.models["big"]
    assert big.cluster is not None
    assert big.cluster.nodes == (("spark2", "big-worker"),) and big.cluster.hold_ttl == 9
    assert loaded.config.peers["spark2"].models == ()  # a cluster peer needs no models
    worker = load(tmp_path, {"models": {"w": {"cmd": "ray start --block", "clusterWorker": True,
                                              "checkEndpoint": "none", "ttl": 60}}})
    w = worker.config.models["w"]
    assert w.cluster_worker and w.check_endpoint is None and w.ttl == 0
    assert any("models.w.ttl" in x for x in worker.warnings)


def test_the_default_hold_ttl_is_15s(tmp_path: Path) -> None:
    big = load(tmp_path, head(nodes={"spark2": "w"}), {"K": "k"}).config.models["big"]
    assert big.cluster is not None and big.cluster.hold_ttl == 15.0


def test_bad_references_name_their_key_path(tmp_path: Path) -> None:
    fails(tmp_path, head(nodes={"spark3": "w"}), "models.big.cluster.nodes.spark3")
    fails(tmp_path, head(nodes={}), "models.big.cluster.nodes")
    fails(tmp_path, head(nodes={"spark2": "../etc"}), "models.big.cluster.nodes.spark2")
    fails(tmp_path, head(nodes={"spark2": "w"}, holdTtl=0), "models.big.cluster.holdTtl")
    fails(tmp_path, head(nodes={"spark2": "w"}, holdTtl=86400), "models.big.cluster.holdTtl")
    both = head(nodes={"spark2": "w"})
    both["models"]["big"]["clusterWorker"] = True
    fails(tmp_path, both, "models.big.clusterWorker")
    lonely = {"peers": {"p": {"proxy": "http://p:1"}}, "models": {"a": {"cmd": "a"}}}
    fails(tmp_path, lonely, "peers.p.models")


def test_warnings_sleep_preload_and_a_peer_without_key(tmp_path: Path) -> None:
    data = head(nodes={"spark2": "w"})
    del data["peers"]["spark2"]["apiKey"]
    data["models"]["big"]["sleepMode"] = "enable"
    data["models"]["big"]["engine"] = "vllm"
    data["models"]["w"] = {"cmd": "worker", "clusterWorker": True}
    data["hooks"] = {"on_startup": {"preload": ["w"]}}
    loaded = load(tmp_path, data)
    assert loaded.config.models["big"].sleep is None
    assert loaded.config.preload == ()
    text = "\n".join(loaded.warnings)
    assert "models.big.sleepMode" in text and "hooks.on_startup.preload[0]" in text
    assert "models.big.cluster.nodes.spark2" in text and "no apiKey" in text


def test_swapd_status_shows_a_heads_nodes_and_a_workers_holder() -> None:
    from swapd.cli import format_status

    base = {"state": "ready", "pid": 1, "uptime": 5, "inflight": 0, "queued": 0}
    doc = {"version": "x", "listen": "l", "tenant": [], "queue": 0, "models": {
        "big": {**base, "cluster": {"role": "head", "hold_ttl": 15, "nodes": [
            {"peer": "spark2", "worker": "w", "state": "held", "hold": "abc", "error": None}]}},
        "w": {**base, "cluster": {"role": "worker", "hold": {
            "id": "abc", "holder": "spark1/big", "ttl": 15, "state": "held",
            "expires_in": 12.5}}},
    }}
    text = format_status(doc, now=0)
    assert "big: node spark2: worker w held" in text
    assert "w: held for spark1/big (hold abc, expires in 12.5s)" in text


def test_swapd_check_prints_the_cluster(tmp_path: Path) -> None:
    from swapd.cli import format_check

    data = head(nodes={"spark2": "w"}, holdTtl=9)
    data["models"]["w"] = {"cmd": "ray start --block", "clusterWorker": True}
    text = format_check(load(tmp_path, data, {"K": "k"}))
    assert "cluster:  holds spark2: w before it starts; renewed every 3s, holdTtl 9s" in text
    assert "a worker: started only by a head's hold" in text
