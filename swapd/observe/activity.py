"""Activity records: one per inference request, built from what the engine already returned.

`Tracker` watches the response bytes as the proxy relays them and never re-serialises them:
it keeps references to the last few chunks and, until the first token, looks for a non-empty
`content`. At the end it decodes only the `usage` and `timings` objects it finds there (OpenAI's
usage chunk, llama.cpp's timings). A stream that carries neither gets its tokens counted from
its content events, and the record says so (`estimated`).

`ActivityLog` owns the records: a bounded ring, live subscribers (`/api/activity/stream`) and,
optionally, a SQLite file under stateDir with a retention. Writes to SQLite are batched in a
worker thread once a second, off the request path.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import structlog

from swapd.files import untrusted

log = structlog.get_logger("swapd.activity")

# How many of the last response chunks are kept for the usage scan. OpenAI's usage chunk and
# llama.cpp's final chunk come last, before `[DONE]`, and `usage`/`timings` close a JSON answer
# (OpenAI, vLLM, llama.cpp, Ollama, Anthropic); a read may split one across two chunks.
TAIL_CHUNKS = 4
# A first token: `"content": "x`, a reasoning model's `"reasoning_content": "x`, a completion's
# or an Anthropic delta's `"text": "x`, a tool call's `"arguments": "x`.
_FIRST_TOKEN = re.compile(rb'"(?:reasoning_content|content|text|arguments)"\s*:\s*"[^"]')
_DECODER = json.JSONDecoder()
SQLITE_FLUSH_SECONDS = 1.0
# Subscribers that read slower than records come lose the oldest ones, never slow the proxy.
SUBSCRIBER_BACKLOG = 256
# Bytes of a stream kept (by reference) after its first token before the older chunks are
# counted and let go: a long stream holds at most this much, plus its last TAIL_CHUNKS.
KEEP_BYTES = 256 * 1024


@dataclass(slots=True)
class Record:
    id: int
    time: float  # wall clock, request received
    model: str
    path: str
    status: int
    stream: bool
    duration: float  # seconds, request received → last byte
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    ttft: float | None = None  # seconds to the first content token (streams)
    prefill_tps: float | None = None
    decode_tps: float | None = None
    estimated: bool = False  # tokens counted from content events, not reported by the engine
    session: str | None = None
    captured: bool = False
    key: str | None = None  # the name of the key the request came with (never the key)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_COLUMNS = tuple(f.name for f in fields(Record))


def find_object(data: bytes, key: bytes) -> dict[str, Any] | None:
    """The JSON object value of the last `"key":` in `data`, decoding only that object."""
    at = data.rfind(b'"' + key + b'"')
    while at >= 0:
        start = data.find(b"{", at + len(key) + 2, at + len(key) + 16)
        if start >= 0:
            try:
                value, _ = _DECODER.raw_decode(data[start:].decode("utf-8", "replace"))
            except ValueError:
                value = None
            if isinstance(value, dict):
                return value
        at = data.rfind(b'"' + key + b'"', 0, at)
    return None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _positive(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


class Tracker:
    """What one response tells about its tokens and speed; fed every chunk the proxy relays.

    Per chunk it only keeps a reference (and, until the first token, looks for one): the
    bytes are scanned once, at the end, and only as far as needed. `usage` and `timings`
    are found from the end (they close an answer); the `data:` events are counted only when
    the engine reported no token count. Past `KEEP_BYTES` the older chunks are counted and
    let go, so a long stream holds a bounded tail (docs/benchmarks.md).
    """

    __slots__ = (
        "_counted_events",
        "_counted_reads",
        "_kept",
        "_kept_size",
        "_scanning",
        "_skip_events",
        "_strip_usage",
        "first_token_at",
        "stream",
        "t0",
    )

    def __init__(self, t0: float, stream: bool, *, strip_usage: bool = False) -> None:
        self.t0 = t0
        self.stream = stream
        self.first_token_at: float | None = None
        # From the first token's chunk on, every chunk not counted yet (before it, the last
        # few: a response without a token still has its usage at the end).
        self._kept: list[bytes] = []
        self._kept_size = 0
        self._counted_events = 0  # `data:` events of the chunks let go
        self._counted_reads = 0  # and how many chunks they were
        self._skip_events = 0  # events before the first token's, in its chunk
        self._strip_usage = strip_usage
        self._scanning = stream  # looking for the first token

    def feed(self, chunk: bytes) -> bytes:
        """Look at one chunk on its way to the client; returns what the client gets (the
        chunk itself, or without the usage event swapd asked for on the client's behalf)."""
        self._kept.append(chunk)
        if self._scanning:
            self._scan(chunk)
        else:
            self._kept_size += len(chunk)
            if self._kept_size > KEEP_BYTES:
                self._let_go()
        # rfind, not `in`: 2.5x faster on a 11 KB read here (usage comes last anyway).
        if self._strip_usage and chunk.rfind(b'"usage"') >= 0:
            return _without_usage_event(chunk)
        return chunk

    def _scan(self, chunk: bytes) -> None:
        match = _FIRST_TOKEN.search(chunk)
        if match is None:
            if len(self._kept) > 2 * TAIL_CHUNKS:
                del self._kept[:-TAIL_CHUNKS]
            return
        self.first_token_at = time.monotonic()
        self._scanning = False
        # Counted from the first token's event on. The chunk stays kept: a short answer's
        # usage may be in it.
        event = max(0, chunk.rfind(b"data:", 0, match.start()))
        self._skip_events = chunk.count(b"data:", 0, event)
        self._kept = [chunk]
        self._kept_size = len(chunk)

    def _let_go(self) -> None:
        """Count the events of all kept chunks but the last TAIL_CHUNKS, and drop them."""
        kept = self._kept
        done = kept[:-TAIL_CHUNKS]
        if self.first_token_at is not None:
            self._counted_reads += len(done)
            self._counted_events += b"".join(done).count(b"data:")
        self._kept = kept = kept[-TAIL_CHUNKS:]
        self._kept_size = sum(map(len, kept))

    def record(
        self, record_id: int, *, model: str, path: str, status: int, session: str | None
    ) -> Record:
        """The finished request's record: when it came, how long it took, what was seen."""
        now = time.monotonic()
        duration = now - self.t0
        record = Record(
            id=record_id,
            time=time.time() - duration,
            model=model,
            path=path,
            status=status,
            stream=self.stream,
            duration=duration,
            session=session,
        )
        self.finish(record, now)
        return record

    def finish(self, record: Record, now: float) -> None:
        """Fill `record`'s tokens and speeds from what was seen."""
        # Engines put usage and timings last in a JSON answer as in a stream.
        kept = self._kept
        data = b"".join(kept[-TAIL_CHUNKS:])
        usage = find_object(data, b"usage")
        timings = find_object(data, b"timings")
        if usage is not None:
            record.prompt_tokens = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
            record.completion_tokens = _int(
                usage.get("completion_tokens", usage.get("output_tokens"))
            )
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):
                record.cached_tokens = _int(details.get("cached_tokens"))
            if record.cached_tokens is None:
                record.cached_tokens = _int(usage.get("cache_read_input_tokens"))
        if timings is not None:
            if record.prompt_tokens is None:
                record.prompt_tokens = _int(timings.get("prompt_n"))
            if record.completion_tokens is None:
                record.completion_tokens = _int(timings.get("predicted_n"))
            if record.cached_tokens is None:
                record.cached_tokens = _int(timings.get("cache_n"))
            record.prefill_tps = _positive(timings.get("prompt_per_second"))
            record.decode_tps = _positive(timings.get("predicted_per_second"))
        if self.first_token_at is not None:
            record.ttft = self.first_token_at - self.t0
            if record.completion_tokens is None:
                whole = data if len(kept) <= TAIL_CHUNKS else b"".join(kept)
                events = self._counted_events + whole.count(b"data:")
                # The role-only first event and the finish event carry no token.
                record.completion_tokens = max(1, events - self._skip_events - 2)
                record.estimated = True
            # Tokens that all came in the first token's read say nothing about decode speed.
            later_reads = self._counted_reads + len(self._kept) - 1
            if record.decode_tps is None and record.completion_tokens > 1 and later_reads:
                decode = now - self.first_token_at
                if decode > 0:
                    record.decode_tps = (record.completion_tokens - 1) / decode
            if record.prefill_tps is None and record.prompt_tokens and record.ttft > 0:
                record.prefill_tps = record.prompt_tokens / record.ttft


def session_of(headers: Mapping[str, str], names: Iterable[str]) -> str | None:
    """The session a request belongs to: the first of the `sessionHeaders` it carries."""
    for name in names:
        session = headers.get(name)
        if session:
            # A client's header: bounded, and bytes that are not UTF-8 (which aiohttp hands
            # over as lone surrogates, and SQLite refuses) replaced.
            return _text(session[:MAX_SESSION_CHARS])
    return None


MAX_SESSION_CHARS = 256


def _text(value: str) -> str:
    """`value` with lone surrogates (undecodable bytes) replaced by U+FFFD."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte (a JSON "\ud800")
        return value.encode("utf-8", "replace").decode("utf-8")


def _without_usage_event(chunk: bytes) -> bytes:
    """`chunk` without the SSE event that carries only usage (`"choices":[]`), which swapd
    asked for with stream_options.include_usage and the client did not. The event is left in
    when it is not whole in this chunk: an extra chunk beats a broken stream."""
    events = chunk.split(b"\n\n")
    kept = [
        e
        for e in events
        if not (b'"usage"' in e and re.search(rb'"choices"\s*:\s*\[\s*\]', e) is not None)
    ]
    if len(kept) == len(events):
        return chunk
    return b"\n\n".join(kept)


class ActivityLog:
    """The records of the last `size` requests, their live subscribers and their SQLite copy."""

    def __init__(
        self, size: int = 1000, *, db_path: Path | None = None, retention_days: float = 7.0
    ) -> None:
        self.size = size
        self._ring: collections.deque[Record] = collections.deque(maxlen=max(1, size))
        self._next_id = 1
        self._subscribers: set[asyncio.Queue[Record | None]] = set()
        self._db_path = db_path
        self._retention = retention_days * 86400
        self._pending: list[Record] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self._flush_lock = asyncio.Lock()

    def load(self) -> None:
        """Fill the ring from SQLite (after a restart); call once logging is set up."""
        if self._db_path is not None:
            self._load(self._db_path)

    @property
    def enabled(self) -> bool:
        return self.size > 0

    @property
    def store(self) -> str:
        """Where usage sums come from: `sqlite` (every record kept), else `memory` (the
        last `size` records)."""
        return "sqlite" if self._db_path is not None else "memory"

    def next_id(self) -> int:
        value = self._next_id
        self._next_id += 1
        return value

    def add(self, record: Record) -> None:
        self._ring.append(record)
        for queue in self._subscribers:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(record)
        if self._db_path is not None:
            self._pending.append(record)
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    def since(self, after: int = 0, limit: int | None = None) -> list[Record]:
        out = [r for r in self._ring if r.id > after]
        return out[-limit:] if limit else out

    def get(self, record_id: int) -> Record | None:
        for record in reversed(self._ring):
            if record.id == record_id:
                return record
        return None

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Record | None]]:
        queue: asyncio.Queue[Record | None] = asyncio.Queue(SUBSCRIBER_BACKLOG)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    async def close(self) -> None:
        """End the live subscribers and write what is pending to SQLite."""
        self._closed = True
        for queue in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        if self._flusher is not None:
            self._flusher.cancel()
        await self._flush()

    # -- SQLite ------------------------------------------------------------------------

    async def _flush_later(self) -> None:
        await asyncio.sleep(SQLITE_FLUSH_SECONDS)
        await self._flush()

    async def _flush(self) -> None:
        # One write at a time: a reader of the store (usage) that flushes first must find
        # the batch an earlier flush took written, not merely taken.
        async with self._flush_lock:
            batch, self._pending = self._pending, []
            if batch and self._db_path is not None:
                try:
                    await asyncio.to_thread(_write, self._db_path, batch, self._retention)
                except (sqlite3.Error, OSError) as exc:
                    log.warning("activity store write failed", error=str(exc))

    async def usage(self, by: str, since: float) -> list[dict[str, Any]]:
        """Requests and tokens since `since` (Unix time), summed by `by` (`key` or
        `model`): from the SQLite store when there is one (what is pending written first),
        else from the records in memory (the last `activity.size`)."""
        if self._db_path is not None:
            await self._flush()
            try:
                rows = await asyncio.to_thread(_sums, self._db_path, by, since)
            except (sqlite3.Error, OSError) as exc:
                log.warning("activity store unreadable", error=str(exc))
            else:
                return [_usage_row(row) for row in rows]
        sums: dict[str | None, list[int]] = {}
        for record in self._ring:
            if record.time >= since:
                row = sums.setdefault(record.key if by == "key" else record.model, [0, 0, 0, 0])
                row[0] += 1
                row[1] += record.status >= 400
                row[2] += record.prompt_tokens or 0
                row[3] += record.completion_tokens or 0
        return [_usage_row((name, *row)) for name, row in sorted(
            sums.items(), key=lambda item: item[0] or "")]

    def today_by_key(self, day_start: float) -> dict[str, tuple[int, int]]:
        """(requests, prompt + completion tokens) per key name since `day_start`, from the
        SQLite store (before serving: the quotas' count after a restart)."""
        if self._db_path is None or not self._db_path.exists():
            return {}
        try:
            rows = _sums(self._db_path, "key", day_start)
        except (sqlite3.Error, OSError) as exc:
            log.warning("activity store unreadable; quotas start from 0", error=str(exc))
            return {}
        return {name: (requests, prompt + completion)
                for name, requests, _, prompt, completion in rows if name}

    def _load(self, path: Path) -> None:
        try:
            rows = _read(path, self._ring.maxlen or 1, self._retention)
        except (sqlite3.Error, OSError) as exc:
            log.warning("activity store unreadable; starting empty", error=str(exc))
            return
        self._ring.extend(rows)
        if rows:
            self._next_id = rows[-1].id + 1


_CREATE = (
    "CREATE TABLE IF NOT EXISTS activity (id INTEGER PRIMARY KEY, time REAL, model TEXT, "
    "path TEXT, status INTEGER, stream INTEGER, duration REAL, prompt_tokens INTEGER, "
    "completion_tokens INTEGER, cached_tokens INTEGER, ttft REAL, prefill_tps REAL, "
    "decode_tps REAL, estimated INTEGER, session TEXT, captured INTEGER, key TEXT)"
)


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Prompts' models, paths and sessions: for swapd's user only (SQLite gives its -wal and
    # -shm files the database's mode).
    problem = untrusted(path)
    if problem is not None:
        raise PermissionError(f"{path} is not swapd's own: {problem}")
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    os.chmod(path, 0o600)
    db = sqlite3.connect(path, timeout=5)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(_CREATE)
    columns = {row[1] for row in db.execute("PRAGMA table_info(activity)")}
    if "key" not in columns:  # a store written before named keys (issue 23)
        db.execute("ALTER TABLE activity ADD COLUMN key TEXT")
    db.execute("CREATE INDEX IF NOT EXISTS activity_time ON activity (time)")
    return db


def _row(record: Record) -> tuple[Any, ...]:
    return tuple(
        _text(v) if isinstance(v := getattr(record, c), str) else v for c in _COLUMNS
    )


_INSERT = (
    f"INSERT OR REPLACE INTO activity ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _COLUMNS)})"
)


def _write(path: Path, records: Iterable[Record], retention: float) -> None:
    """Write the records; one that cannot be written is logged and skipped, never the
    others of its batch."""
    rows = [_row(r) for r in records]
    db = _connect(path)
    try:
        try:
            with db:
                db.executemany(_INSERT, rows)
        except (sqlite3.Error, ValueError) as exc:
            log.warning("activity batch refused; writing its records one by one",
                        error=str(exc))
            for row in rows:
                try:
                    with db:
                        db.execute(_INSERT, row)
                except (sqlite3.Error, ValueError) as one:
                    log.warning("activity record not stored", id=row[0], error=str(one))
        with db:
            db.execute("DELETE FROM activity WHERE time < ?", (time.time() - retention,))
    finally:
        db.close()


def _sums(path: Path, by: str, since: float) -> list[tuple[Any, ...]]:
    column = "key" if by == "key" else "model"
    db = _connect(path)
    try:
        return db.execute(
            f"SELECT {column}, COUNT(*), SUM(status >= 400), "
            "COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0) "
            f"FROM activity WHERE time >= ? GROUP BY {column} ORDER BY {column}",
            (since,),
        ).fetchall()
    finally:
        db.close()


def _usage_row(row: tuple[Any, ...]) -> dict[str, Any]:
    name, requests, errors, prompt, completion = row
    return {"name": name, "requests": int(requests), "errors": int(errors or 0),
            "prompt_tokens": int(prompt), "completion_tokens": int(completion),
            "tokens": int(prompt) + int(completion)}


def _read(path: Path, limit: int, retention: float) -> list[Record]:
    if not path.exists():
        return []
    db = _connect(path)
    try:
        rows = db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM activity WHERE time >= ? "
            "ORDER BY id DESC LIMIT ?",
            (time.time() - retention, limit),
        ).fetchall()
    finally:
        db.close()
    out = []
    for row in reversed(rows):
        values = dict(zip(_COLUMNS, row, strict=True))
        for flag in ("stream", "estimated", "captured"):
            values[flag] = bool(values[flag])
        out.append(Record(**values))
    return out
