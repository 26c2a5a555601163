"""`swapd litellm-config`: a LiteLLM config for this node's models.

The output starts LiteLLM as it is (`litellm --config FILE`): LiteLLM refuses to start
without a master key, so `general_settings.master_key` names an environment variable, never
a key. With two Sparks, LiteLLM (an existing router) sits in front of one swapd per Spark;
each node prints its config and the operator appends the second node's `model_list` entries
to the first (docs/scale-out.md). `model_list` comes last so that the entries are the tail.
"""

from __future__ import annotations

import re

import yaml

from swapd.config.nodes import local_url
from swapd.config.types import Config

MASTER_KEY = "os.environ/LITELLM_MASTER_KEY"
HEADER = """\
# LiteLLM config for this swapd node (swapd litellm-config).
# LiteLLM will not start without a master key: general_settings.master_key reads it from
# the environment variable LITELLM_MASTER_KEY (the key is never written here), e.g.
#   LITELLM_MASTER_KEY=sk-... litellm --config litellm.yaml --port 4000
# Clients then use that key as their API key.
"""
# The variable LiteLLM reads swapd's API key from when the config writes its key literally.
DEFAULT_KEY_ENV = "SWAPD_API_KEY"
_ENV_REF = re.compile(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)\}")


def key_env_name(raw_api_keys: object) -> str:
    """The environment variable that holds swapd's API key for LiteLLM: the one the config's
    first `apiKeys` entry reads (`${env.LLAMA_KEY}`), else SWAPD_API_KEY."""
    first = raw_api_keys[0] if isinstance(raw_api_keys, list) and raw_api_keys else raw_api_keys
    found = _ENV_REF.fullmatch(first.strip()) if isinstance(first, str) else None
    return found[1] if found else DEFAULT_KEY_ENV


def litellm_config(config: Config, url: str | None = None,
                   key_env: str = DEFAULT_KEY_ENV) -> str:
    """`key_env`: the variable LiteLLM reads swapd's API key from (only its name is
    written: `os.environ/NAME`)."""
    base = (url or local_url(config.listen)).rstrip("/")
    entries = []
    for model in config.models.values():
        if model.unlisted:
            continue
        for name in (model.id, *model.aliases):
            params: dict[str, object] = {
                # LiteLLM's "openai/" provider speaks the OpenAI API to api_base.
                "model": f"openai/{name}",
                "api_base": f"{base}/v1",
                "api_key": f"os.environ/{key_env}" if config.api_keys else "none",
            }
            entry: dict[str, object] = {"model_name": name, "litellm_params": params}
            if model.description:
                entry["model_info"] = {"description": model.description}
            entries.append(entry)
    header = HEADER
    if config.api_keys:
        header += (f"# swapd's config sets apiKeys: LiteLLM reads the key from {key_env} "
                   "(api_key below).\n")
    settings = yaml.safe_dump({"general_settings": {"master_key": MASTER_KEY}}, sort_keys=False)
    return header + settings + yaml.safe_dump({"model_list": entries}, sort_keys=False)
