"""Activity records, start-time estimates, captures and redaction, without processes.

The bytes fed here are what engines really send: OpenAI's streamed chunks with the usage chunk
before `[DONE]`, llama.cpp's `timings`, chunks split mid-event by the network.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from swapd.engines.starts import KEEP, StartTimes, estimate, remaining
from swapd.http.proxy import with_usage_option
from swapd.observe.activity import KEEP_BYTES, ActivityLog, Record, Tracker, find_object
from swapd.observe.capture import CaptureBuffer
from swapd.redact import MASK, redact_headers, redact_text


def event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    return event(
        {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta,
                                                         "finish_reason": finish}], **extra}
    )


USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14,
         "prompt_tokens_details": {"cached_tokens": 8}}


def run_stream(parts: list[bytes], strip: bool = False) -> tuple[Record, bytes]:
    t0 = time.monotonic()
    tracker = Tracker(t0, True, strip_usage=strip)
    out = b"".join(tracker.feed(p) for p in parts)
    record = Record(id=1, time=0, model="m", path="/v1/chat/completions", status=200,
                    stream=True, duration=0)
    tracker.finish(record, time.monotonic() + 0.1)
    return record, out


def test_a_stream_usage_chunk_gives_exact_tokens_and_ttft_is_the_first_content() -> None:
    parts = [
        chunk({"role": "assistant", "content": ""}),  # role only: not a token
        chunk({"content": "Hel"}),
        chunk({"content": "lo"}),
        chunk({"content": "!"}),
        chunk({}, "stop"),
        event({"object": "chat.completion.chunk", "choices": [], "usage": USAGE}),
        b"data: [DONE]\n\n",
    ]
    record, out = run_stream(parts)
    assert out == b"".join(parts)  # relayed untouched
    assert (record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (11, 3, 8)
    assert not record.estimated
    assert record.ttft is not None and record.ttft >= 0
    assert record.decode_tps is not None and record.prefill_tps is not None


def test_a_usage_event_split_across_reads_is_still_found() -> None:
    whole = chunk({"content": "x"}) + chunk({}, "stop") + event(
        {"choices": [], "usage": USAGE}) + b"data: [DONE]\n\n"
    cut = whole.index(b'"usage"') + 10
    record, out = run_stream([whole[:cut], whole[cut:]])
    assert out == whole
    assert record.completion_tokens == 3


def test_llama_cpp_timings_give_speeds_and_cache() -> None:
    timings = {"cache_n": 5, "prompt_n": 7, "prompt_per_second": 812.5,
               "predicted_n": 2, "predicted_per_second": 41.0}
    record, _ = run_stream([chunk({"content": "a"}), chunk({"content": "b"}),
                            chunk({}, "stop", timings=timings), b"data: [DONE]\n\n"])
    assert (record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (7, 2, 5)
    assert (record.prefill_tps, record.decode_tps) == (812.5, 41.0)
    assert not record.estimated


def test_a_stream_without_usage_counts_its_content_events_as_an_estimate() -> None:
    parts = [chunk({"role": "assistant"})] + [chunk({"content": f"t{i}"}) for i in range(6)]
    parts += [chunk({}, "stop"), b"data: [DONE]\n\n"]
    record, _ = run_stream(parts)
    assert record.estimated
    assert record.completion_tokens == 6
    assert record.prompt_tokens is None


def test_a_long_stream_is_counted_exactly_while_its_tracker_holds_a_bounded_tail() -> None:
    # 5000 tokens of about 100 bytes, some reads holding several events, one cut mid-event.
    body = chunk({"role": "assistant"}) + b"".join(chunk({"content": f"t{i}"})
                                                    for i in range(5000))
    body += chunk({}, "stop") + b"data: [DONE]\n\n"
    parts = [body[i:i + 700] for i in range(0, len(body), 700)]
    tracker = Tracker(time.monotonic(), True)
    held = 0
    for part in parts:
        tracker.feed(part)
        held = max(held, sum(map(len, tracker._kept)))
    record = Record(id=1, time=0, model="m", path="/v1/chat/completions", status=200,
                    stream=True, duration=0)
    tracker.finish(record, time.monotonic() + 1)
    assert len(body) > 2 * KEEP_BYTES  # let go of twice
    assert held <= KEEP_BYTES + 4 * 700
    assert record.estimated and record.completion_tokens == 5000
    assert record.decode_tps is not None


def test_the_injected_usage_chunk_is_removed_for_the_client_and_counted() -> None:
    tail = chunk({}, "stop") + event({"choices": [], "usage": USAGE}) + b"data: [DONE]\n\n"
    record, out = run_stream([chunk({"content": "hi"}), tail], strip=True)
    assert b'"usage"' not in out
    assert out.endswith(chunk({}, "stop") + b"data: [DONE]\n\n")
    assert record.completion_tokens == 3 and not record.estimated


def test_a_json_answer_gives_usage_without_parsing_its_content() -> None:
    body = json.dumps({"choices": [{"message": {"content": 'say "usage": {"x": 1}'}}],
                       "usage": {"prompt_tokens": 4, "completion_tokens": 9}}).encode()
    tracker = Tracker(time.monotonic(), False)
    assert tracker.feed(body[:20]) + tracker.feed(body[20:]) == body
    record = Record(id=1, time=0, model="m", path="/v1/chat/completions", status=200,
                    stream=False, duration=0)
    tracker.finish(record, time.monotonic())
    assert (record.prompt_tokens, record.completion_tokens) == (4, 9)
    assert record.ttft is None and not record.estimated


def test_find_object_takes_the_last_usage_and_survives_garbage() -> None:
    assert find_object(b'{"usage": {"a": 1}} {"usage": {"a": 2}}', b"usage") == {"a": 2}
    assert find_object(b'"usage": nope', b"usage") is None
    assert find_object(b'"usage": {"a": ', b"usage") is None


def test_the_ring_keeps_the_last_n_and_since_pages_through_them() -> None:
    log = ActivityLog(3)
    for _ in range(5):
        log.add(Record(id=log.next_id(), time=0, model="m", path="/p", status=200,
                       stream=False, duration=0))
    assert [r.id for r in log.since()] == [3, 4, 5]
    assert [r.id for r in log.since(4)] == [5]
    assert log.get(1) is None and log.get(4) is not None


async def test_sqlite_keeps_records_across_a_restart_within_the_retention(tmp_path: Path) -> None:
    db = tmp_path / "activity.sqlite3"
    log = ActivityLog(10, db_path=db, retention_days=1)
    old = Record(id=log.next_id(), time=time.time() - 3 * 86400, model="m", path="/p",
                 status=200, stream=True, duration=1.0)
    log.add(old)
    new = Record(id=log.next_id(), time=time.time(), model="m", path="/p", status=200,
                 stream=True, duration=1.0, prompt_tokens=5, session="s1", estimated=True)
    log.add(new)
    await log.close()
    again = ActivityLog(10, db_path=db, retention_days=1)
    again.load()
    assert again.since() == [new]  # the 3-day-old one is past the retention
    assert again.next_id() == new.id + 1


async def test_a_subscriber_gets_new_records_and_the_end() -> None:
    log = ActivityLog(10)
    got: list[int] = []

    async def read() -> None:
        async with log.subscribe() as queue:
            ready.set()
            while (item := await queue.get()) is not None:
                got.append(item.id)

    ready = asyncio.Event()
    task = asyncio.create_task(read())
    await ready.wait()
    log.add(Record(id=log.next_id(), time=0, model="m", path="/p", status=200, stream=False,
                   duration=0))
    await log.close()
    await asyncio.wait_for(task, 5)
    assert got == [1]


def test_the_start_estimate_is_the_median_of_recent_starts(tmp_path: Path) -> None:
    assert estimate([]) is None
    assert estimate([10, 300, 12]) == 12  # one slow cold start does not move it
    assert remaining(40, 10) == 30
    assert remaining(40, 55) == 1  # overdue: "any moment", never negative
    starts = StartTimes(tmp_path)
    for seconds in range(1, KEEP + 5):
        starts.record("big", float(seconds))
    # Only the last KEEP are kept, and they survive a restart.
    again = StartTimes(tmp_path)
    assert again.expected("big") == estimate([float(s) for s in range(5, KEEP + 5)])
    assert again.eta("big", started_at=1000.0, now=1003.0) == again.expected("big") - 3
    assert again.expected("other") is None


def test_a_corrupt_start_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "start-times.json").write_text("{not json")
    assert StartTimes(tmp_path).expected("m") is None


def test_captures_are_redacted_and_the_oldest_go_first() -> None:
    buf = CaptureBuffer(1 / 1024)  # 1 KiB
    body = json.dumps({"model": "m", "api_key": "sk-secret", "messages": []}).encode()
    first = buf.start({"Authorization": "Bearer sk-live", "X-Session-ID": "s"}, body)
    buf.respond(first, {"Content-Type": "application/json", "Set-Cookie": "a=b"})
    buf.feed(first, b'{"ok": true}')
    buf.keep(1, first)
    shown = first.to_json()
    assert shown["request"]["headers"] == {"Authorization": MASK, "X-Session-ID": "s"}
    assert "sk-secret" not in shown["request"]["body"] and MASK in shown["request"]["body"]
    assert shown["response"]["headers"]["Set-Cookie"] == MASK
    assert shown["response"]["body"] == '{"ok": true}'
    second = buf.start({}, b"x" * 900)
    buf.feed(second, b"y" * 500)  # past the limit: cut, and said so
    buf.keep(2, second)
    assert second.truncated and second.size == 1024
    assert buf.get(1) is None and buf.get(2) is second


def test_redaction_keeps_what_is_not_secret() -> None:
    assert redact_headers({"Content-Type": "a", "X-Api-Key": "k", "Cookie": "c"}) == {
        "Content-Type": "a", "X-Api-Key": MASK, "Cookie": MASK}
    text = '{"max_tokens": "5", "password": "hunter2", "hf_token" : "hf_x", "content": "key"}'
    assert redact_text(text) == (
        f'{{"max_tokens": "5", "password": "{MASK}", "hf_token" : "{MASK}", "content": "key"}}'
    )


def test_activity_keys_load_and_bad_values_name_their_key_path(tmp_path: Path) -> None:
    import pytest

    from swapd.config.loader import load_config
    from swapd.config.nodes import ConfigError

    def load(extra: str) -> Any:
        path = tmp_path / "c.yaml"
        path.write_text("models:\n  m:\n    cmd: engine --port ${PORT}\n" + extra)
        return load_config(path).config

    cfg = load("activity:\n  size: 50\n  injectUsage: true\n  store: sqlite\n"
               "captureBuffer: 2\nui:\n  activity:\n    session_id: [X-Conv]\n")
    assert (cfg.activity_size, cfg.activity_inject_usage, cfg.activity_store) == (50, True, True)
    assert cfg.capture_buffer_mb == 2 and cfg.session_headers == ("X-Conv",)
    assert load("").activity_size == 1000 and load("").capture_buffer_mb == 0
    for bad, where in [("activity:\n  size: -1\n", "activity.size"),
                       ("activity:\n  store: redis\n", "activity.store"),
                       ("activity:\n  injectUsage: yes please\n", "activity.injectUsage"),
                       ("captureBuffer: lots\n", "captureBuffer")]:
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            load(bad)


def test_a_tool_call_stream_has_a_first_token_too() -> None:
    call = {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}
    record, _ = run_stream([chunk({"role": "assistant", "content": None}), chunk(call),
                            chunk({}, "tool_calls"), b"data: [DONE]\n\n"])
    assert record.ttft is not None


def test_a_big_json_answer_is_read_only_at_its_end() -> None:
    body = json.dumps({"data": [{"embedding": [0.1] * 5000} for _ in range(20)],
                       "usage": {"prompt_tokens": 40, "total_tokens": 40}}).encode()
    tracker = Tracker(time.monotonic(), False)
    for i in range(0, len(body), 65536):
        tracker.feed(body[i:i + 65536])
    record = Record(id=1, time=0, model="m", path="/v1/embeddings", status=200,
                    stream=False, duration=0)
    tracker.finish(record, time.monotonic())
    assert record.prompt_tokens == 40 and record.completion_tokens is None


def test_usage_option_is_appended_to_the_body_as_sent() -> None:
    """A stream's request gets stream_options.include_usage without being re-serialised:
    the client's own bytes (spacing, key order, escapes) reach the engine."""
    body = b'{"model": "m",\n "stream": true, "messages": [{"content": "caf\\u00e9 }"}]}\n'
    out = with_usage_option(body)
    assert out.startswith(body.rstrip()[:-1])
    assert json.loads(out) == {**json.loads(body), "stream_options": {"include_usage": True}}
