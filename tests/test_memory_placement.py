"""Memory end to end under a real swapd: the release wait, footprint learning, the memory router.

Engines are fake engines that allocate real RAM (`--alloc-mb`, pages touched). The machine is
shared with other test runs, so allocations stay at a few hundred MiB and the decisions are
forced with `memory:` sizes and a `reserve` computed from MemAvailable when the test starts.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swapd.config.sizes import MiB
from tests.support import HOG, Swapd, fake_cmd, model, pid_alive, wait_until
from tests.support.memory import chat, total

# Real RAM, and floors or fits measured from MemAvailable: one such test at a time (the
# real_memory fixture's lock; their xdist group too), so none moves MemAvailable under another.
pytestmark = [pytest.mark.xdist_group("real_memory"), pytest.mark.usefixtures("real_memory")]


def measured(daemon: Swapd, name: str, at_least: int) -> int:
    def used() -> int | None:
        value = daemon.status()["models"][name]["memory"]["used"]
        return value if value is not None and value >= at_least else None
    return int(wait_until(used, timeout=10, interval=0.1, message=f"{name}'s memory measured"))


def test_the_release_wait_measures_the_engine_not_the_room(start_swapd) -> None:
    # Something else allocates while the tenant runs: more than the old rule's 2% of MemTotal.
    hog_bytes = int(total() * 0.02) + 300 * MiB
    daemon = start_swapd({
        "models": {
            "a": model(fake_cmd("--alloc-mb", "300", name="a"), memoryReleaseTimeout=20),
            "b": model(fake_cmd(name="b")),
        },
    })
    assert chat(daemon, "a")[0] == 200
    measured(daemon, "a", 300 * MiB)
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(hog_bytes)], stdout=subprocess.PIPE)
    try:
        assert hog.stdout is not None and hog.stdout.readline().strip() == b"holding"
        t0 = time.monotonic()
        code, doc = chat(daemon, "b")
        swap = time.monotonic() - t0
    finally:
        hog.kill()
        hog.wait()
    assert code == 200, doc
    # The old rule (MemAvailable back to its level before `a` started, within 2%) would have
    # waited the whole memoryReleaseTimeout for the hog's memory.
    assert "memory not released in time" not in daemon.log()
    assert swap < 10, f"the swap took {swap:.1f}s"


def test_a_footprint_is_learned_kept_and_used_on_the_next_start(start_swapd,
                                                                tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = {"models": {"a": model(fake_cmd("--alloc-mb", "200", name="a"))}}
    daemon = start_swapd(config, state_dir=state)
    assert daemon.status()["models"]["a"]["memory"]["footprint"] is None
    assert chat(daemon, "a")[0] == 200
    measured(daemon, "a", 200 * MiB)
    # Prometheus sees the same peak the status shows.
    peak = re.search(r'^swapd_engine_memory_peak_bytes\{model="a"\} (\S+)$',
                     daemon.get("/metrics")[1], re.M)
    assert peak is not None and float(peak.group(1)) >= 200 * MiB
    assert daemon.post("/models/a/unload")[0] == 200
    path = state / "footprints.json"
    wait_until(path.exists, message="footprints.json written")  # off the event loop
    saved = json.loads(path.read_text())["models"]["a"]["bytes"]
    assert 200 * MiB <= saved < 400 * MiB
    daemon.stop()
    # A new swapd reads it back and places with it.
    again = start_swapd(config, state_dir=state)
    doc = again.status()["models"]["a"]["memory"]
    assert doc["footprint"] == saved and doc["footprint_source"] == "learned"
    assert not pid_alive(daemon.proc.pid)
