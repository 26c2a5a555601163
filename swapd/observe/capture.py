"""llama-swap's captureBuffer: the last N MB of request and response bodies, by activity id.

Off unless `captureBuffer` is set. What is kept is already redacted (secret headers, secret
JSON fields), so nothing unmasked sits in memory for a page to show. The oldest captures go
first when the bytes pass the limit; a single body is cut at the limit.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from swapd.redact import redact_headers, redact_text


@dataclass
class Capture:
    request_headers: dict[str, str]
    request_body: bytes
    response_headers: dict[str, str] = field(default_factory=dict)
    response_body: list[bytes] = field(default_factory=list)
    response_size: int = 0
    truncated: bool = False

    @property
    def size(self) -> int:
        return len(self.request_body) + self.response_size

    def to_json(self) -> dict[str, Any]:
        return {
            "request": {
                "headers": self.request_headers,
                "body": redact_text(self.request_body.decode("utf-8", "replace")),
            },
            "response": {
                "headers": self.response_headers,
                "body": redact_text(b"".join(self.response_body).decode("utf-8", "replace")),
            },
            "truncated": self.truncated,
        }


class CaptureBuffer:
    def __init__(self, megabytes: float) -> None:
        self.limit = int(megabytes * 1024 * 1024)
        self._items: collections.OrderedDict[int, Capture] = collections.OrderedDict()
        self._size = 0

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def start(self, headers: Any, body: bytes) -> Capture:
        capture = Capture(redact_headers(headers), body[: self.limit])
        capture.truncated = len(body) > self.limit
        return capture

    def respond(self, capture: Capture, headers: Any) -> None:
        capture.response_headers = redact_headers(headers)

    def feed(self, capture: Capture, chunk: bytes) -> None:
        room = self.limit - capture.size
        if room <= 0:
            capture.truncated = True
            return
        if len(chunk) > room:
            chunk = chunk[:room]
            capture.truncated = True
        capture.response_body.append(chunk)
        capture.response_size += len(chunk)

    def keep(self, record_id: int, capture: Capture) -> None:
        self._items[record_id] = capture
        self._size += capture.size
        while self._size > self.limit and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._size -= old.size

    def get(self, record_id: int) -> Capture | None:
        return self._items.get(record_id)
