"""Atomic file writes: readers see the old content or the new, never a part. And what swapd
reads back from its state folder: only its own files, strict JSON."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename over `path`, fsync the folder.

    Raises OSError (read-only folder, disk full); `path` is then left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temps(folder: Path) -> list[str]:
    """Remove the temp files `write_atomic` left in `folder` when its writer died between
    the temp file and the rename (a SIGKILL, a power cut): swapd's own (ours by uid,
    regular, named `.{file}.*.tmp`), never anything else. Called before anything in this
    swapd writes there, so no write of its own is under way. The names removed.
    """
    removed = []
    for path in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                path.unlink()
                removed.append(path.name)
    return sorted(removed)


# -- what swapd reads back from stateDir ------------------------------------------------------


def untrusted(path: Path, *, directory: bool = False) -> str | None:
    """Why `path` (a state file or the state folder) is not to be trusted, None when it is
    swapd's own or does not exist: it must belong to swapd's user and be writable by no one
    else (a group other than the user's own included); a state file must not be a symlink.

    A planted `engines.json` made swapd kill an unrelated process (issue 21): what swapd
    reads back must be what swapd wrote.
    """
    try:
        st = os.stat(path) if directory else os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot stat it: {exc.strerror or exc}"
    if not directory and stat.S_ISLNK(st.st_mode):
        return "it is a symlink"
    if directory and not stat.S_ISDIR(st.st_mode):
        return "it is not a folder"
    if st.st_uid != os.geteuid():
        return f"it belongs to uid {st.st_uid}, not to swapd's user ({os.geteuid()})"
    if st.st_mode & stat.S_IWOTH:
        return "anyone may write to it (mode o+w)"
    if st.st_mode & stat.S_IWGRP and st.st_gid != os.getegid():
        return f"group {st.st_gid} may write to it (mode g+w)"
    return None


def read_state_json(path: Path) -> Any:
    """The JSON document of a state file, None when there is none. ValueError when the file
    is not to be trusted (see `untrusted`) or is not strict JSON: `NaN` and `Infinity` are
    refused (read back into /v1/models they made its JSON invalid)."""
    problem = untrusted(path)
    if problem is not None:
        raise ValueError(f"{path} is not swapd's own: {problem}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return json.loads(text, parse_constant=_no_constant)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number swapd writes")
