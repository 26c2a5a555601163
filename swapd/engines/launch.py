"""What an engine is exec'd with: its environment, and whether its program can be exec'd.

Functions of a recipe (and swapd's environment, less swapd's own keys), shared by the
engine (at spawn) and `swapd check` (before anything runs): neither needs an Engine.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable

from swapd.config.types import ModelConfig
from swapd.systemd import SYSTEMD_ENV_VARS

# Variables that hold swapd's own keys, by name (`swapd status` reads SWAPD_ADMIN_KEY).
SWAPD_KEY_VARS = ("SWAPD_ADMIN_KEY", "SWAPD_API_KEY")
# The values of swapd's own keys (apiKeys, adminKeys, peers' apiKey), set by the daemon at
# each (re)load: a variable of swapd's environment holding one (`${env.ADMIN_KEY}`) is not
# passed on to engines.
_swapd_keys: frozenset[str] = frozenset()


def keep_from_engines(values: Iterable[str]) -> None:
    """Engines do not inherit a variable whose value is one of these (replaces the last
    set); a recipe that names the variable in its `env` still gives it to its engine."""
    global _swapd_keys
    _swapd_keys = frozenset(v for v in values if v)


def engine_environment(cfg: ModelConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment an engine is exec'd with: swapd's, cleaned, plus the recipe's.
    Cleaned: systemd's notification variables and swapd's own keys (an engine is another
    program; the admin key would make it swapd's admin) go, unless the recipe names them."""
    env = dict(os.environ if base is None else base)
    for name in [k for k, v in env.items() if k in SWAPD_KEY_VARS or v in _swapd_keys]:
        del env[name]
    # An engine that saw NOTIFY_SOCKET could send READY=1 / WATCHDOG=1 for swapd.
    for name in (*SYSTEMD_ENV_VARS, *cfg.env_remove):
        if name.endswith("*"):  # a prefix (a preset's "LLAMA_ARG_*")
            for key in [k for k in env if k.startswith(name[:-1])]:
                del env[key]
        env.pop(name, None)
    env.update(dict(cfg.env))
    return env


def exec_problem(argv: tuple[str, ...], env: dict[str, str]) -> str | None:
    """Why `argv[0]` cannot be exec'd with `env` the way `start()` execs it, or None.

    A name without a slash is looked up on the PATH of the engine's environment (which is
    swapd's own: systemd's default under the unit, without any virtualenv on it).
    """
    program = argv[0]
    if "/" in program:
        if not os.path.isfile(program):
            return f"{program} does not exist"
        if not os.access(program, os.X_OK):
            return f"{program} is not executable"
        return None
    path = env.get("PATH", os.defpath)
    if shutil.which(program, path=path) is None:
        return f"{program!r} is not on the PATH engines run with ({path})"
    return None
