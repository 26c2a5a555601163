"""Helpers shared by the benchmark's servers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from aiohttp import web


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``"uvloop"`` → uvloop's loop factory; ``"asyncio"`` → None (the standard loop)."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def run_app(app: web.Application, host: str, port: int, loop: str = "asyncio") -> None:
    """Serve `app` until SIGTERM/SIGINT, on the named event loop."""

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None, handle_signals=True)
        await runner.setup()
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with asyncio.Runner(loop_factory=loop_factory(loop)) as r:
        try:
            r.run(serve())
        except (KeyboardInterrupt, web.GracefulExit):
            pass


def write_section(doc: Path, begin: str, end: str, text: str) -> None:
    """Put `text` between the `begin` and `end` markers of `doc` (both appended at its end when
    absent), leaving the rest of the file as it is."""
    content = doc.read_text()
    if begin not in content:
        content = content.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{text}\n{end}{tail}")
