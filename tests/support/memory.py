"""Real memory for the end-to-end memory tests: MemAvailable and MemTotal now, a chat request."""

from __future__ import annotations

from typing import Any

from swapd.memory.meminfo import MemReader
from tests.support import Swapd


def available() -> int:
    reader = MemReader()
    try:
        return reader.read().available
    finally:
        reader.close()


def total() -> int:
    reader = MemReader()
    try:
        return reader.read().total
    finally:
        reader.close()


def chat(daemon: Swapd, name: str, timeout: float = 60) -> tuple[int, Any]:
    return daemon.post("/v1/chat/completions",
                       {"model": name, "messages": [{"role": "user", "content": "hi"}]},
                       timeout=timeout)
