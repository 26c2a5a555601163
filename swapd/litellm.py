"""`swapd litellm-config`: a LiteLLM config for this node's models.

The output starts LiteLLM as it is (`litellm --config FILE`): LiteLLM refuses to start
without a master key, so `general_settings.master_key` names an environment variable, never
a key. With two Sparks, LiteLLM (an existing router) sits in front of one swapd per Spark;
each node prints its config and the operator appends the second node's `model_list` entries
to the first (docs/scale-out.md). `model_list` comes last so that the entries are the tail.
"""

from __future__ import annotations

import yaml

from swapd.config.types import Config

MASTER_KEY = "os.environ/LITELLM_MASTER_KEY"
HEADER = """\
# LiteLLM config for this swapd node (swapd litellm-config).
# LiteLLM will not start without a master key: general_settings.master_key reads it from
# the environment variable LITELLM_MASTER_KEY (the key is never written here), e.g.
#   LITELLM_MASTER_KEY=sk-... litellm --config litellm.yaml --port 4000
# Clients then use that key as their API key. With apiKeys set in swapd's config, LiteLLM
# also needs SWAPD_API_KEY (api_key below).
"""


def litellm_config(config: Config, url: str | None = None) -> str:
    base = (url or f"http://{config.listen}").rstrip("/")
    if base.startswith("http://0.0.0.0"):
        base = base.replace("0.0.0.0", "127.0.0.1", 1)
    entries = []
    for model in config.models.values():
        if model.unlisted:
            continue
        for name in (model.id, *model.aliases):
            params: dict[str, object] = {
                # LiteLLM's "openai/" provider speaks the OpenAI API to api_base.
                "model": f"openai/{name}",
                "api_base": f"{base}/v1",
                "api_key": "os.environ/SWAPD_API_KEY" if config.api_keys else "none",
            }
            entry: dict[str, object] = {"model_name": name, "litellm_params": params}
            if model.description:
                entry["model_info"] = {"description": model.description}
            entries.append(entry)
    settings = yaml.safe_dump({"general_settings": {"master_key": MASTER_KEY}}, sort_keys=False)
    return HEADER + settings + yaml.safe_dump({"model_list": entries}, sort_keys=False)
