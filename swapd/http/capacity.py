"""llama-swap's `globalConcurrencyLimit`: inference requests served at once, every model
together. Past it a request is answered 429 at once, as in llama-swap (no queue: a client
backs off as it does for a model's `concurrencyLimit`). 0 is no limit, and costs nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from swapd.errors import ApiError


class GlobalLimit:
    """The count of inference requests being served (from routing to the end of the
    response), shared by every model. Only the event loop touches it."""

    def __init__(self) -> None:
        self.held = 0

    def check(self, limit: int) -> None:
        """Raise the 429 when `limit` requests are being served already."""
        if limit and self.held >= limit:
            raise ApiError(
                f"{self.held} inference requests are being served, as many as "
                "globalConcurrencyLimit allows; retry later",
                status=429, code="global_concurrency_limit", type="rate_limit_error")

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1
