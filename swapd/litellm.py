"""`swapd litellm-config`: a LiteLLM `model_list` for this node's models.

With two Sparks, LiteLLM (an existing router) sits in front of one swapd per Spark;
each node prints its part and the operator concatenates them.
"""

from __future__ import annotations

import yaml

from swapd.config import Config


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
    return yaml.safe_dump({"model_list": entries}, sort_keys=False)
