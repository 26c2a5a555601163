"""A real Ray pair under two swapds (issue 24): `ray start --head` under node 1's head
recipe, `ray start --address … --block` as node 2's worker recipe, on loopback. Ray's
daemons daemonise (gcs_server, raylet, their Python agents): after a stop on either side,
every one of them must be gone.

Needs a Python with `ray` (SWAPD_RAY_PYTHON, e.g. a venv where `pip install ray` ran: a
79 MB wheel, ~285 MB installed, a minute to install here): skipped without it, and not in
CI for that reason (docs/two-sparks.md)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import Swapd, free_port, model, wait_until

RAY_PYTHON = os.environ.get("SWAPD_RAY_PYTHON", "")
HERE = Path(__file__).resolve().parent
KEY2 = "node2-admin-key"

pytestmark = [
    pytest.mark.late,
    pytest.mark.skipif(not (RAY_PYTHON and Path(RAY_PYTHON).exists()),
                       reason="no Python with ray (SWAPD_RAY_PYTHON)"),
]


def ray_processes(marker: str) -> list[int]:
    """Every process whose command line names this test's Ray temp dir."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(entry))
    return found


def test_a_real_ray_pair_starts_as_one_and_leaves_no_daemon(
        start_swapd: Callable[..., Swapd], tmp_path: Path) -> None:
    gcs = free_port()
    temp = tempfile.mkdtemp(prefix="sray", dir="/tmp")  # short: Ray's unix socket paths
    ray = str(Path(RAY_PYTHON).parent / "ray")
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    worker = model(f"{ray} start --block --address=127.0.0.1:{gcs} --num-cpus=1 "
                   f"--num-gpus=0 --disable-usage-stats --temp-dir={temp}",
                   clusterWorker=True, checkEndpoint="none", unloadTimeout=15,
                   env=[f"{k}={v}" for k, v in env.items()])
    node2 = start_swapd({"adminKeys": [KEY2], "models": {"llama-70b-worker": worker}},
                        name="node2.yaml", state_dir=tmp_path / "s2")
    head = model(f"{RAY_PYTHON} {HERE / 'ray_head.py'} --port ${{PORT}} --gcs-port {gcs} "
                 f"--nodes 2 --temp-dir {temp}", healthCheckTimeout=180, unloadTimeout=15,
                 env=[f"{k}={v}" for k, v in env.items()],
                 cluster={"nodes": {"spark2": "llama-70b-worker"}, "holdTtl": 15})
    node1 = start_swapd({"peers": {"spark2": {"proxy": node2.url, "apiKey": KEY2}},
                         "models": {"llama-70b": head}}, name="node1.yaml",
                        state_dir=tmp_path / "s1")
    code, body = node1.post("/v1/chat/completions", {"model": "llama-70b", "messages": []},
                            timeout=240)
    assert code == 200, (body, node1.log()[-3000:], node2.log()[-3000:])
    assert body["choices"][0]["message"]["content"] == "2 ray nodes"
    assert len(ray_processes(temp)) >= 4  # gcs_server, raylets, agents on both sides
    # stop on node 1: the head's whole tree, then the hold released, the worker's tree
    code, _ = node1.post("/models/llama-70b/unload", timeout=120)
    assert code == 200
    wait_until(lambda: not ray_processes(temp), timeout=60,
               message=f"every Ray daemon gone: {ray_processes(temp)}")
    # and again, stopped from node 2's side this time (an admin unload of the worker)
    code, _ = node1.post("/v1/chat/completions", {"model": "llama-70b", "messages": []},
                         timeout=240)
    assert code == 200
    code, _ = node2.post("/models/llama-70b-worker/unload",
                         headers={"Authorization": f"Bearer {KEY2}"}, timeout=120)
    assert code == 200
    wait_until(lambda: not ray_processes(temp), timeout=60,
               message=f"every Ray daemon gone: {ray_processes(temp)}")
    shutil.rmtree(temp, ignore_errors=True)
