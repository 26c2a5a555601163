"""Engine state changes as a stream for HTTP listeners (llama-swap's `/api/events`,
llama.cpp's `/models/sse`).

The scheduler's observer publishes `(model, state)` as it happens; each listener has a
bounded queue of its own. A listener too slow to keep up loses events rather than holding
memory or the scheduler (both routes resend the whole picture where it matters: a listener
that lost one re-reads `/models` or `/running`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

# Events a listener may fall behind by before it loses some.
BACKLOG = 256


@dataclass(frozen=True, slots=True)
class StateEvent:
    model: str
    state: str  # the engine state word: stopped, starting, ready, stopping, failed


class StateEvents:
    def __init__(self) -> None:
        self._listeners: set[asyncio.Queue[StateEvent | None]] = set()

    def publish(self, model: str, state: str) -> None:
        event = StateEvent(model, state)
        for queue in self._listeners:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(event)

    @contextlib.asynccontextmanager
    async def listen(self) -> AsyncIterator[asyncio.Queue[StateEvent | None]]:
        queue: asyncio.Queue[StateEvent | None] = asyncio.Queue(BACKLOG)
        self._listeners.add(queue)
        try:
            yield queue
        finally:
            self._listeners.discard(queue)

    def close(self) -> None:
        """Shutdown: every listener's stream ends (None), so the server's cleanup need not
        wait for them."""
        for queue in self._listeners:
            if queue.full():
                queue.get_nowait()  # the end matters more than one event it would miss
            queue.put_nowait(None)

    @property
    def listeners(self) -> int:
        return len(self._listeners)
