"""Recipe files written by the admin API: which folder, which file name, how a body is
parsed, and which existing files swapd may replace.

The rules (docs/security.md):
- Recipes are written only into the folder of the `include` glob (the part before its first
  wildcard), and never when that folder holds the main config: `include: "*.yaml"` would let
  `PUT /admin/recipes/config` replace config.yaml and drop its keys.
- The file is `{id}.yaml` (or `{id}.yml`), and only when the glob loads it: an id that
  `recipes/qwen-*.yaml` does not match is refused, not written where no reload reads it.
- A file swapd writes starts with the `MARKER` line; swapd replaces or deletes only such
  files, never a hand-written recipe or a symlink.
- A body is JSON or YAML by Content-Type (a browser form cannot send either without a CORS
  preflight), at most `MAX_RECIPE_BYTES`, without duplicate keys and without YAML aliases
  (a 466-byte "billion laughs" body would otherwise expand to gigabytes).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from swapd.config.loader import MAX_VALUES, expanded_size
from swapd.config.nodes import DuplicateKeyLoader, include_pattern, valid_id
from swapd.config.types import Config
from swapd.errors import ApiError

MARKER = "# swapd recipe"
MAX_RECIPE_BYTES = 1024 * 1024
BODY_TYPES = {
    "application/json": "json",
    "application/yaml": "yaml",
    "application/x-yaml": "yaml",
    "text/yaml": "yaml",
    "text/x-yaml": "yaml",
}
_MAGIC = re.compile(r"[*?[]")


class RecipeError(ApiError):
    """A recipe request refused; carries the HTTP answer."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message, status=status, code=code)


class _RecipeLoader(DuplicateKeyLoader):
    """Duplicate keys refused (as in config files) and aliases refused outright: a recipe is a
    few dozen values, and `*a` repeated is how a small body becomes a huge one."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not accepted in recipes", event.start_mark
            )
        return super().compose_node(parent, index)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def body_kind(content_type: str) -> str:
    """"json" or "yaml" for a recipe body's Content-Type; RecipeError 415 otherwise."""
    kind = BODY_TYPES.get(content_type.split(";")[0].strip().lower())
    if kind is None:
        raise RecipeError(
            415,
            "a recipe body must be sent as Content-Type: application/json or application/yaml"
            f", got {content_type or 'none'}",
            "unsupported_media_type",
        )
    return kind


def parse_body(raw: bytes, kind: str) -> Any:
    """A recipe body as data; RecipeError 400 for anything unparsable or unbounded."""
    try:
        text = raw.decode("utf-8")
        if kind == "json":
            data = json.loads(text, object_pairs_hook=_no_duplicates)
        else:
            data = yaml.load(text, Loader=_RecipeLoader)
        if _deeper_than(data, MAX_DEPTH):
            # Parsed, but 900 nested lists in `metadata` exhausted the recursion of what
            # checks and renders a recipe (a 500): refused here, as the client's input.
            raise RecursionError
        return data
    except UnicodeDecodeError:
        raise RecipeError(400, "recipe body is not UTF-8 text", "bad_recipe") from None
    except RecursionError:
        raise RecipeError(
            400, f"recipe body is nested too deeply (more than {MAX_DEPTH} levels)", "bad_recipe"
        ) from None
    except (ValueError, yaml.YAMLError) as exc:
        raise RecipeError(400, f"recipe body does not parse: {exc}", "bad_recipe") from None


# Nesting deeper than this is no recipe (metadata is a few levels at most).
MAX_DEPTH = 64


def _deeper_than(data: Any, limit: int) -> bool:
    """True when lists and mappings in `data` nest more than `limit` deep (no recursion)."""
    stack = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth >= limit:
                return True
            items = value.values() if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
    return False


def recipe_path(config: Config, recipe_id: str) -> Path:
    """Where recipe `recipe_id` is written; RecipeError when it must not be written at all."""

    if not valid_id(recipe_id):
        raise RecipeError(
            400,
            f"invalid recipe id {recipe_id[:80]!r}: it must match "
            "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$ and not contain '..'",
            "invalid_id",
        )
    folder, name_pattern = recipe_folder(config)
    for ext in (".yaml", ".yml"):
        if fnmatch.fnmatchcase(recipe_id + ext, name_pattern):
            return folder / (recipe_id + ext)
    raise RecipeError(
        409,
        f"the include glob {config.include!r} would not load {folder / recipe_id}.yaml: "
        f"recipe ids must fit {name_pattern!r}",
        "id_not_included",
    )


def recipe_folder(config: Config) -> tuple[Path, str]:
    """The folder recipes are written into and the file-name pattern the glob loads there."""
    if not config.include:
        raise RecipeError(
            409,
            "recipes need an `include` glob in the config (e.g. include: recipes/*.yaml)",
            "no_include",
        )
    main = Path(config.source or "config.yaml").absolute()
    pattern = Path(include_pattern(str(main), config.include))
    parts = pattern.parts
    first = next((i for i, part in enumerate(parts) if _MAGIC.search(part)), None)
    if first is None:
        raise RecipeError(
            409,
            f"include {config.include!r} names one file; recipes need a glob over a folder "
            "of their own (e.g. include: recipes/*.yaml)",
            "no_recipe_folder",
        )
    folder = Path(*parts[:first])
    rest = list(parts[first:])
    while len(rest) > 1 and rest[0] == "**":
        rest.pop(0)  # `**` also matches no folder at all
    if len(rest) != 1 or _MAGIC.search(str(folder)):
        raise RecipeError(
            409,
            f"include {config.include!r} loads files in subfolders only; recipes are written "
            f"as {folder}/ID.yaml (use e.g. include: recipes/*.yaml)",
            "no_recipe_folder",
        )
    real_folder = Path(os.path.realpath(folder))
    real_main = Path(os.path.realpath(main))
    if real_main.parent == real_folder or real_folder in real_main.parents:
        raise RecipeError(
            409,
            f"include {config.include!r} covers the folder of the main config ({main.name}); "
            "recipes are written only into a folder of their own "
            "(e.g. include: recipes/*.yaml)",
            "no_recipe_folder",
        )
    return folder, rest[0]


def existing(path: Path) -> bytes | None:
    """The current content of a recipe file swapd may replace, None when there is none;
    RecipeError 409 for a file swapd did not write (or a symlink)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        raise RecipeError(
            409, f"{path} is a symlink; swapd replaces only recipe files it wrote", "not_a_recipe"
        )
    if not stat.S_ISREG(info.st_mode):
        return None  # a folder in the way: the write itself fails, with its reason
    data = path.read_bytes()
    if not data.startswith(MARKER.encode()):
        raise RecipeError(
            409,
            f"{path} was not written by swapd (its first line is not {MARKER!r}); edit it by "
            "hand, or remove it first",
            "not_a_recipe",
        )
    return data


def render(recipe_id: str, entry: Any) -> bytes:
    head = (
        f"{MARKER} {recipe_id}: written by PUT /admin/recipes/{recipe_id}; swapd replaces or "
        "deletes only files that start with this line\n"
    )
    return (head + yaml.safe_dump({"models": {recipe_id: entry}}, sort_keys=False)).encode()


def read_entry(path: Path, recipe_id: str) -> Any:
    """The entry a recipe file holds for `recipe_id` (None when the file has none)."""
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=DuplicateKeyLoader)
    if expanded_size(data) > MAX_VALUES:
        raise RecipeError(500, f"{path} expands to too many values", "bad_recipe_file")
    if data is None:
        return None  # an empty file
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        # Edited by hand into something else: say so, rather than "no recipe".
        raise RecipeError(
            422,
            f"recipe file {path.name} is not a mapping with `models:` (a recipe file holds "
            f"models: {{{recipe_id}: ...}})",
            "bad_recipe_file",
        )
    return models.get(recipe_id)
