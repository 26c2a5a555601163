"""The thinnest relay: the floor for any Python proxy (contender (b) of the benchmark).

    python -m bench.relay --port N --upstream http://127.0.0.1:M [--loop asyncio|uvloop]

No routing, auth, metrics, logging or error handling: read the body, send it upstream, copy
status and headers, copy the body chunk by chunk as it arrives.
"""

import argparse

import aiohttp
from aiohttp import web

from bench.common import run_app

SKIP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


def build(upstream: str) -> web.Application:
    async def relay(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in SKIP}
        body = await request.read()
        async with app["session"].request(
            request.method, upstream + request.path_qs, headers=headers, data=body
        ) as up:
            resp = web.StreamResponse(status=up.status)
            resp.headers.update((k, v) for k, v in up.headers.items() if k.lower() not in SKIP)
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def session(app: web.Application):  # type: ignore[no-untyped-def]
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app["session"].close()

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    opts = parser.parse_args()
    run_app(build(opts.upstream.rstrip("/")), "127.0.0.1", opts.port, opts.loop)


if __name__ == "__main__":
    main()
