"""What Prometheus scrapes from a real swapd: every error series there before the first
error, answers refused before routing counted, the exposition passing `promtool check
metrics`, and a scrape that stays small and cheap with a thousand configured recipes."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from bench.metrics_scrape import tuner_ids
from swapd.observe.metrics import MODEL_CODES, UNROUTED_CODES, Metrics
from tests.support import fake_cmd, http, metric_value, model
from tests.support.samples import FixedSampler, gb10_sample

CHAT = "/v1/chat/completions"
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool missing (Debian: apt-get install prometheus)"
)


def promtool_check(text: str) -> None:
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60, check=False)
    # promtool prints lint problems and exits 1 (3 for a parse error).
    assert done.returncode == 0, done.stdout + done.stderr
    assert (done.stdout + done.stderr).strip() == "", done.stdout + done.stderr


def test_error_series_exist_before_the_first_error_and_pre_routing_answers_count(
    start_swapd,
) -> None:
    daemon = start_swapd({
        "apiKeys": ["sk-test"],
        "models": {"m": model(fake_cmd(name="m"))},
    })
    key = {"Authorization": "Bearer sk-test"}
    _, scrape = daemon.get("/metrics")
    for code in MODEL_CODES:  # 503 and 504 among them: increase() sees the first one
        assert f'swapd_requests_total{{code="{code}",model="m"}} 0.0' in scrape
    assert 'swapd_stream_errors_total{model="m"} 0.0' in scrape
    for code in UNROUTED_CODES:
        assert f'swapd_requests_total{{code="{code}",model=""}} 0.0' in scrape
    assert metric_value(scrape, "process_resident_memory_bytes") > 0
    assert metric_value(scrape, "process_start_time_seconds") > 0

    def post(body: object, headers: dict[str, str]) -> int:
        return http("POST", daemon.url + CHAT, body, headers=headers, timeout=30)[0]

    assert post({"model": "m"}, {}) == 401
    assert post({"model": "m"}, {"Authorization": "Bearer wrong"}) == 401
    assert post({"model": "nope"}, key) == 404
    assert post("{not json", {**key, "Content-Type": "application/json"}) == 400
    assert http("POST", daemon.url + "/upstream/nope/v1/models", {}, headers=key)[0] == 404
    assert post({"model": "m", "messages": []}, key) == 200

    _, scrape = daemon.get("/metrics")
    assert metric_value(scrape, "swapd_requests_total", model="", code="401") == 2
    assert metric_value(scrape, "swapd_requests_total", model="", code="404") == 2
    assert metric_value(scrape, "swapd_requests_total", model="", code="400") == 1
    assert metric_value(scrape, "swapd_requests_total", model="m", code="200") == 1
    if shutil.which("promtool"):
        promtool_check(scrape)


@needs_promtool
def test_promtool_accepts_every_family() -> None:
    metrics = Metrics()
    metrics.register_models(["qwen", "gemma"])
    metrics.attach_sampler(FixedSampler(gb10_sample()))
    series = metrics.series("qwen")
    series.answered(200, 1.5)
    series.ttfb.observe(0.2)
    series.stream_errors.inc()
    metrics.set_engine_state("qwen", "ready")
    metrics.engine_starts.labels("qwen", "success").inc()
    metrics.engine_start_seconds.labels("qwen").observe(40)
    metrics.engine_stops.labels("qwen", "swap").inc()
    metrics.unrouted(404)
    promtool_check(metrics.render()[0].decode())


def test_a_thousand_recipes_scrape_under_1_mb_and_100_ms() -> None:
    # The Spark tuner writes one recipe per model, runtime and recipe hash. With no traffic,
    # a scrape must stay small and cheap with the series above included.
    metrics = Metrics()
    ids = tuner_ids(1000)
    metrics.register_models(ids)
    body, _ = metrics.render()
    assert len(body) < 1_000_000, len(body)
    assert body.count(b"swapd_requests_total{") == 1000 * len(MODEL_CODES) + len(UNROUTED_CODES)
    assert body.count(b"swapd_stream_errors_total{") == 1000
    # CPU time, not wall time: what a scrape costs swapd, whatever else the machine runs.
    cpu = []
    for _ in range(5):
        t0 = time.process_time()
        metrics.render()
        cpu.append(time.process_time() - t0)
    assert min(cpu) < 0.1, cpu
