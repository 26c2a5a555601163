"""What the aiohttp app holds for its handlers, under typed keys (aiohttp's `AppKey`).

The daemon puts these in the app once, before it starts; handlers read them from
`request.app`. The config is a holder, not the config itself: a reload swaps what it
holds (an app's keys are fixed once it runs), and every request reads the config in
force when it arrived.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from swapd.config.types import Config


class LiveConfig:
    """The config in force. Only the daemon (startup, reload) assigns `config`."""

    __slots__ = ("config",)

    def __init__(self, config: Config) -> None:
        self.config = config


CONFIG = web.AppKey("config", LiveConfig)
# The client session every relay to an engine goes through (connection reuse); opened and
# closed with the app (its cleanup context).
UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)


def config_of(request: web.Request) -> Config:
    """The config in force for this request."""
    return request.app[CONFIG].config
