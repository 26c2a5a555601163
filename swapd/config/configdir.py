"""llama-swap's `-config-dir`: a folder of `*.yml`/`*.yaml` files merged into the config.

llama-swap (`internal/config/merge.go`) reads the `-config` file first, then each file
directly under the folder in file-name order, and merges them into one document: mappings
merge key by key, lists are concatenated, equal scalars agree, a null gives way, and two
different scalars at one key path are an error. Under the maps whose keys name things
(`models`, `groups`, `peers`, ...) a name defined by two files is an error. swapd merges
the same way; each model keeps the file it came from, so that an error in it names that
file.
"""

from __future__ import annotations

import os
from typing import Any

from swapd.config.nodes import Ctx

# Maps whose keys name one thing each: defining a name twice is an error (llama-swap's
# identityMapPaths).
IDENTITY_MAPS = frozenset({
    "models", "groups", "profiles", "selectors", "peers", "matrix",
    "routing.router.settings.groups", "routing.router.settings.matrix",
})


def dir_files(folder: str) -> list[str]:
    """The `*.yml` and `*.yaml` files directly in `folder` (not in sub-folders), by name."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise OSError(f"-config-dir {folder}: {exc.strerror or exc}") from None
    return [
        os.path.join(folder, name) for name in names
        if name.endswith((".yml", ".yaml")) and os.path.isfile(os.path.join(folder, name))
    ]


def merge(ctx: Ctx, into: dict[Any, Any], data: dict[Any, Any], path: str = "") -> None:
    """Merge `data` (read from `ctx.file`) into `into`, in place, by llama-swap's rules."""
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in into:
            into[key] = value
            continue
        old = into[key]
        if where in IDENTITY_MAPS and isinstance(old, dict) and isinstance(value, dict):
            for name, entry in value.items():
                if name in old:
                    ctx.fail(f"{where}.{name}", "already defined in another config file "
                             "(-config / -config-dir)")
                old[name] = entry
        elif isinstance(old, dict) and isinstance(value, dict):
            merge(ctx, old, value, where)
        elif isinstance(old, list) and isinstance(value, list):
            into[key] = [*old, *value]
        elif value is None:
            continue
        elif old is None:
            into[key] = value
        elif isinstance(old, dict | list) or isinstance(value, dict | list):
            ctx.fail(where, "a mapping, a list and a value cannot be merged (-config-dir)")
        elif old != value or type(old) is not type(value):
            ctx.fail(where, "set to a different value by another config file (-config-dir)")
