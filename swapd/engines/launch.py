"""What an engine is exec'd with: its environment, and whether its program can be exec'd.

Pure functions of a recipe (and swapd's environment), shared by the engine (at spawn) and
`swapd check` (before anything runs): neither needs an Engine for them.
"""

from __future__ import annotations

import os
import shutil

from swapd.config.types import ModelConfig
from swapd.systemd import SYSTEMD_ENV_VARS


def engine_environment(cfg: ModelConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment an engine is exec'd with: swapd's, cleaned, plus the recipe's."""
    env = dict(os.environ if base is None else base)
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
