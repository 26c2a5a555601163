"""`swapd litellm-config`: a LiteLLM model_list for this node, and two nodes merged as
docs/scale-out.md shows."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def litellm_config(config: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "swapd", "litellm-config", "--config", str(config), *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_model_list_for_this_node() -> None:
    out = litellm_config(ROOT / "examples" / "trtllm-brain-and-sprinter.yaml",
                         "--url", "http://spark-1.lan:28080/")
    entries = yaml.safe_load(out)["model_list"]
    names = [e["model_name"] for e in entries]
    assert names == ["gpt-oss-120b", "brain", "gpt-oss-20b", "sprinter"]  # ids and aliases
    for e in entries:
        params = e["litellm_params"]
        # LiteLLM's openai/ provider speaks the OpenAI API to api_base; swapd routes by name.
        assert params["model"] == f"openai/{e['model_name']}"
        assert params["api_base"] == "http://spark-1.lan:28080/v1"
        assert params["api_key"] == "none"


def test_keys_unlisted_and_listen_address(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(textwrap.dedent("""
        listen: 0.0.0.0:28080
        apiKeys: [sk-spark]
        models:
          chat: {cmd: "x --port ${PORT}", description: the chat model}
          hidden: {cmd: "x --port ${PORT}", unlisted: true}
        """))
    entries = yaml.safe_load(litellm_config(config))["model_list"]
    assert [e["model_name"] for e in entries] == ["chat"]
    params = entries[0]["litellm_params"]
    # 0.0.0.0 is where swapd listens, not an address to connect to.
    assert params["api_base"] == "http://127.0.0.1:28080/v1"
    assert params["api_key"] == "os.environ/SWAPD_API_KEY"  # never the key itself
    assert entries[0]["model_info"] == {"description": "the chat model"}


def test_two_sparks_merge_into_one_model_list() -> None:
    spark1 = litellm_config(ROOT / "examples" / "trtllm-brain-and-sprinter.yaml",
                            "--url", "http://spark-1.lan:28080")
    spark2 = litellm_config(ROOT / "examples" / "vllm-nemotron-3-nano.yaml",
                            "--url", "http://spark-2.lan:28080")
    # docs/scale-out.md: the second node's entries (`sed '1,/^model_list:/d'`) appended.
    lines = spark2.splitlines(keepends=True)
    merged = yaml.safe_load(spark1 + "".join(lines[lines.index("model_list:\n") + 1:]))
    assert merged["general_settings"] == {"master_key": "os.environ/LITELLM_MASTER_KEY"}
    bases = {e["model_name"]: e["litellm_params"]["api_base"] for e in merged["model_list"]}
    assert bases["brain"] == "http://spark-1.lan:28080/v1"
    assert bases["nemotron-3-nano"] == bases["nano"] == "http://spark-2.lan:28080/v1"
    assert len(merged["model_list"]) == 4 + 3


def test_output_starts_litellm_with_a_master_key_from_the_environment(tmp_path: Path) -> None:
    # LiteLLM 1.108 refuses to start without general_settings.master_key.
    config = tmp_path / "c.yaml"
    config.write_text('apiKeys: [sk-spark]\nmodels:\n  chat: {cmd: "x --port ${PORT}"}\n')
    out = litellm_config(config)
    doc = yaml.safe_load(out)
    assert doc["general_settings"] == {"master_key": "os.environ/LITELLM_MASTER_KEY"}
    assert list(doc) == ["general_settings", "model_list"]  # entries last: they merge by tail
    comments = [line for line in out.splitlines() if line.startswith("#")]
    assert any("LITELLM_MASTER_KEY" in line and "environment variable" in line
               for line in comments), comments
    assert "sk-spark" not in out  # no key is ever written out
