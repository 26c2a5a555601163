"""A config file with four models and the routing text a test adds, loaded as swapd loads it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from swapd.config.loader import load_config
from swapd.config.nodes import ConfigError
from swapd.config.types import LoadResult

MODELS = """
models:
  gemma-model: {cmd: "g --port ${PORT}"}
  qwen-model: {cmd: "q --port ${PORT}", aliases: [qwen]}
  voxtral-model: {cmd: "v --port ${PORT}"}
  big: {cmd: "b --port ${PORT}"}
"""


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> LoadResult:
    path = tmp_path / "config.yaml"
    path.write_text(MODELS + textwrap.dedent(text))
    return load_config(path, environ=environ or {})


def error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value
