"""Take the /ui screenshots in docs/ (README): a real swapd, a real browser, real engines.

    .venv/bin/python scripts/ui_screenshots.py [--out docs]

The scene: fake engines (tests/fake_engine.py, real processes) stand in for the models a Spark
runs, one of them loading with the ETA its earlier start taught swapd, one answering the page's
chat box with a canned reply; NVML is the tests' fake GB10 (swapd reads /proc/meminfo there, as
on a real GB10). Needs /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import FAKE_ENGINE, free_port, port_block, wait_until  # noqa: E402
from tests.support.nvml import FAKE_PYNVML  # noqa: E402

PY = sys.executable


def fake(name: str, *flags: str) -> str:
    return f"{PY} {FAKE_ENGINE} --port ${{PORT}} --model-name {name} " + " ".join(flags)


def post(url: str, body: object, headers: dict[str, str] | None = None) -> bytes:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return resp.read()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "docs"))
    out = Path(parser.parse_args().out)
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="swapd-shots-"))
    (work / "fake-nvml").mkdir()
    (work / "fake-nvml" / "pynvml.py").write_text(FAKE_PYNVML)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    reply = ("A GPU never sleeps: it swaps one tenant out, loads the next, and streams its "
             "tokens while you read this line.")
    config = {
        "listen": f"127.0.0.1:{port}",
        "stateDir": str(work / "state"),
        "startPort": port_block(),
        "captureBuffer": 8,
        "activity": {"injectUsage": True},
        "models": {
            "gemma-3-27b": {
                "name": "Gemma 3 27B", "description": "llama.cpp, Q4_K_M",
                "cmd": fake("gemma-3-27b", "--timings", "--token-delay", "0.03",
                            "--stream-tokens", str(len(reply.split())), "--reply", f"'{reply}'"),
            },
            "gpt-oss-120b": {
                "name": "gpt-oss 120B", "description": "vLLM, MXFP4",
                "cmd": fake("gpt-oss-120b", "--timings", "--boot-delay", "4",
                            "--stream-tokens", "40", "--token-delay", "0.02"),
            },
            "qwen3-coder-30b": {
                "name": "Qwen3 Coder 30B A3B", "description": "llama.cpp, Q8_0",
                "cmd": fake("qwen3-coder-30b", "--timings", "--stream-tokens", "30"),
            },
            "nomic-embed": {
                "name": "nomic-embed-text v1.5", "description": "embeddings, CPU",
                "cmd": fake("nomic-embed"), "gpu": False,
            },
        },
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": f"{work / 'fake-nvml'}{os.pathsep}{ROOT}"}
    log = (work / "swapd.log").open("wb")
    proc = subprocess.Popen([PY, "-m", "swapd", "serve", "--config", str(work / "config.yaml")],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _ok(url + "/health"), timeout=30, message="swapd")
        # Earlier work, so that the activity list and the ETA have something to show.
        post(url + "/models/gpt-oss-120b/load", None)
        for i in range(3):
            post(url + "/v1/chat/completions",
                 {"model": "gpt-oss-120b", "stream": True, "messages": [
                     {"role": "user", "content": f"Plan the refactor, step {i}"}]},
                 {"X-Session-ID": "claude-code-7f3a"})
        post(url + "/v1/chat/completions",
             {"model": "qwen3-coder-30b", "stream": True,
              "messages": [{"role": "user", "content": "fix the test"}]},
             {"X-Session-ID": "aider-12"})
        post(url + "/v1/embeddings", {"model": "nomic-embed", "input": ["a", "b"]})
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                        args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000},
                                    device_scale_factor=1)
            page.goto(url + "/ui")
            page.wait_for_selector(".model[data-model='gemma-3-27b']")
            page.select_option("#chat-model", "gemma-3-27b")
            page.fill("#chat-input", "Write a haiku about a GPU that never sleeps.")
            page.press("#chat-input", "Enter")
            page.wait_for_selector("#activity-rows tr[data-model='gemma-3-27b']")
            page.wait_for_timeout(500)
            page.locator("#chat").screenshot(path=str(out / "ui-chat.png"))
            # A load under way, with the ETA its earlier start taught swapd.
            threading.Thread(target=post, args=(url + "/models/gpt-oss-120b/load", None),
                             daemon=True).start()
            page.wait_for_selector(".model[data-model='gpt-oss-120b'][data-state='starting']")
            page.wait_for_timeout(1600)
            page.locator("#models").screenshot(path=str(out / "ui-models.png"))
            page.locator("#gpu").screenshot(path=str(out / "ui-gpu.png"))
            page.wait_for_selector(".model[data-model='gpt-oss-120b'][data-state='ready']")
            post(url + "/v1/chat/completions",
                 {"model": "gpt-oss-120b", "stream": True,
                  "messages": [{"role": "user", "content": "and now the tests"}]},
                 {"X-Session-ID": "claude-code-7f3a"})
            page.wait_for_timeout(1200)
            page.locator("#activity").screenshot(path=str(out / "ui-activity.png"))
            page.select_option("#log-source", "gemma-3-27b")
            page.wait_for_timeout(800)
            page.locator("#logs").screenshot(path=str(out / "ui-logs.png"))
            page.select_option("#log-source", "")
            page.wait_for_timeout(800)
            # The whole page in one tall viewport (a full-page capture would paint the sticky
            # header where the page happened to be scrolled).
            page.set_viewport_size({"width": 1400, "height": 1520})
            page.wait_for_timeout(300)
            page.screenshot(path=str(out / "ui.png"))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
    print("screenshots in", out)


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


if __name__ == "__main__":
    main()
