"""The /ui page in a real headless browser (Debian's chromium, driven by Playwright).

A real swapd, real fake engines, a real browser: the page shows every model and its state, its
buttons start and stop engines (checked through /running, not through the page), a chat from the
page shows up in the activity list with its tokens, engine log lines arrive live, and with
adminKeys set the page asks for the key and sends it as a header, never in a URL.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import fake_cmd, model, wait_until

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("SWAPD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("no chromium (apt-get install chromium; .ci/run does)", allow_module_level=True)

TIMEOUT_MS = 15_000
expect = sync_api.expect
expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    pg.errors = errors
    yield pg
    context.close()


def two_models() -> dict[str, Any]:
    return {
        "models": {
            "alpha": model(fake_cmd("--timings", "--stream-tokens", "6", name="alpha"),
                           name="Alpha 7B", description="the first"),
            "beta": model(fake_cmd(name="beta")),
        }
    }


def running(daemon: Any) -> list[str]:
    code, doc = daemon.get("/running")
    assert code == 200, doc
    return [r["model"] for r in doc["running"] if r["state"] == "ready"]


def card(page: Any, model_id: str) -> str:
    return f".model[data-model='{model_id}']"


def test_the_page_shows_every_model_and_its_buttons_start_and_stop_engines(
    start_swapd, page,
) -> None:
    daemon = start_swapd(two_models())
    page.goto(daemon.url + "/")  # a browser at the root lands on the page
    assert page.url.endswith("/ui")
    for model_id in ("alpha", "beta"):
        page.wait_for_selector(card(page, model_id) + "[data-state='stopped']")
    assert "Alpha 7B" in page.inner_text(card(page, "alpha"))
    page.click(card(page, "alpha") + " button.load")
    wait_until(lambda: running(daemon) == ["alpha"], message="alpha running")
    page.wait_for_selector(card(page, "alpha") + "[data-state='ready']")
    assert page.inner_text("#tenant") == "alpha"
    page.click(card(page, "alpha") + " button.unload")
    wait_until(lambda: running(daemon) == [], message="nothing running")
    page.wait_for_selector(card(page, "alpha") + "[data-state='stopped']")
    expect(page.locator(card(page, "alpha"))).to_contain_text("unload")  # last exit's reason
    assert page.errors == []


def test_a_chat_from_the_page_shows_in_activity_with_tokens_and_logs_arrive_live(
    start_swapd, page,
) -> None:
    daemon = start_swapd(two_models())
    page.goto(daemon.url + "/ui")
    page.wait_for_selector(card(page, "alpha"))
    expect(page.locator("#log-lines")).to_contain_text("swapd listening")
    page.select_option("#chat-model", "alpha")
    page.fill("#chat-input", "hello")
    page.press("#chat-input", "Enter")
    expect(page.locator(".msg.assistant")).to_contain_text("tok0 tok1 tok2 tok3 tok4 tok5")
    row = page.wait_for_selector("#activity-rows tr[data-model='alpha']")
    cells = [c.inner_text() for c in row.query_selector_all("td")]
    # time, model, status, in, out, cached, TTFT, prefill, decode, duration, key, session
    assert cells[1:6] == ["alpha", "200", "3", "6", "2"]
    assert cells[7:9] == ["240.0", "50.0"]
    assert cells[10] == ""  # no keys in this config
    assert cells[11].startswith("ui-")  # the page's own X-Session-ID
    # The engine's lines came live, after the page opened: its start and the request.
    expect(page.locator("#log-lines")).to_contain_text(
        "[alpha] request POST /v1/chat/completions"
    )
    # A request from elsewhere shows up too, without reloading.
    daemon.post("/v1/chat/completions", {"model": "beta", "messages": []})
    page.wait_for_selector("#activity-rows tr[data-model='beta']")
    assert page.errors == []


def test_with_admin_keys_the_page_asks_for_the_key_and_sends_it_as_a_header(
    start_swapd, page,
) -> None:
    daemon = start_swapd({**two_models(), "adminKeys": ["s3cret-admin"]})
    urls: list[str] = []
    sent: list[str] = []
    page.on("request", lambda r: (urls.append(r.url),
                                  sent.append(r.headers.get("authorization", ""))))
    page.goto(daemon.url + "/ui")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", "wrong")
    page.click("#key-save")
    page.wait_for_selector("#key-dialog[open]")
    expect(page.locator("#key-error")).to_contain_text("refused")
    page.fill("#key-input", "s3cret-admin")
    page.click("#key-save")
    page.wait_for_selector(card(page, "beta") + "[data-state='stopped']")
    page.click(card(page, "beta") + " button.load")
    wait_until(lambda: daemon.get("/running", {"Authorization": "Bearer s3cret-admin"})[1]
               ["running"], message="beta running")
    assert page.evaluate("sessionStorage.getItem('swapd.adminKey')") == "s3cret-admin"
    assert "Bearer s3cret-admin" in sent
    assert not any("s3cret" in url for url in urls)


def test_the_sleep_button_puts_a_sleepy_model_to_sleep_and_load_wakes_it(
    start_swapd, page, tmp_path,
) -> None:
    """Warm swaps (docs/sleep.md): Sleep beside Unload, only for recipes that may sleep."""
    daemon = start_swapd({"models": {
        "alpha": model(fake_cmd("--alloc-mb", "64", name="alpha"), engine="vllm",
                       sleepMode="enable", healthCheckTimeout=60),
        "beta": model(fake_cmd(name="beta")),
    }})
    page.goto(daemon.url + "/ui")
    page.wait_for_selector(card(page, "alpha") + "[data-state='stopped']")
    expect(page.locator(card(page, "beta") + " button.sleep")).to_be_hidden()
    expect(page.locator(card(page, "alpha") + " button.sleep")).to_be_disabled()
    page.click(card(page, "alpha") + " button.load")
    page.wait_for_selector(card(page, "alpha") + "[data-state='ready']")
    pid = daemon.status()["models"]["alpha"]["pid"]
    page.click(card(page, "alpha") + " button.sleep")
    page.wait_for_selector(card(page, "alpha") + "[data-state='sleeping']")
    assert daemon.status()["models"]["alpha"]["pid"] == pid
    expect(page.locator("#tenant")).to_have_text("none")
    expect(page.locator(card(page, "alpha") + " .badge")).to_have_text("sleeping")
    expect(page.locator(card(page, "alpha") + " button.unload")).to_be_enabled()
    page.screenshot(path=str(tmp_path / "ui-sleeping.png"))
    shots = os.environ.get("SWAPD_SCREENSHOTS")
    if shots:
        page.screenshot(path=os.path.join(shots, "ui-sleeping.png"))
    page.click(card(page, "alpha") + " button.load")  # a load wakes it
    page.wait_for_selector(card(page, "alpha") + "[data-state='ready']")
    assert daemon.status()["models"]["alpha"]["pid"] == pid
    assert page.errors == []


def test_the_chat_sends_the_api_key_it_is_given_never_the_admin_key(start_swapd, page) -> None:
    """Issue 21 item 7: the chat box sent the admin key to /v1 (and, with
    forwardClientAuth, to the engine). It sends the API key typed beside it, or none."""
    daemon = start_swapd({
        **two_models(), "adminKeys": ["s3cret-admin"], "apiKeys": ["chat-api-key"],
    })
    chats: list[str | None] = []
    page.on("request", lambda r: chats.append(r.headers.get("authorization"))
            if r.url.endswith("/v1/chat/completions") else None)
    page.goto(daemon.url + "/ui")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", "s3cret-admin")
    page.click("#key-save")
    page.wait_for_selector(card(page, "alpha"))
    page.select_option("#chat-model", "alpha")
    page.fill("#chat-input", "hello without a key")
    page.press("#chat-input", "Enter")
    expect(page.locator("#chat-log .msg.note")).to_contain_text("needs an API key")
    page.fill("#chat-key", "chat-api-key")
    page.dispatch_event("#chat-key", "change")
    page.fill("#chat-input", "hello")
    page.press("#chat-input", "Enter")
    expect(page.locator("#chat-log .msg.assistant").last).to_contain_text("tok")
    assert chats == [None, "Bearer chat-api-key"]
    assert page.evaluate("sessionStorage.getItem('swapd.apiKey')") == "chat-api-key"


def test_from_another_machine_the_page_says_what_to_set_then_takes_an_api_key(
    start_swapd, page, tmp_path,
) -> None:
    """Issue 22: on the LAN with no key set, one line says what to set instead of every panel
    failing; with apiKeys set (and no adminKeys), the API key opens the page's routes."""
    from tests.support import free_port, non_loopback_address

    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    port = free_port()
    start_swapd({**two_models(), "listen": f":{port}"}, port=port)
    page.goto(f"http://{address}:{port}/ui")
    line = page.locator("#refused")
    expect(line).to_be_visible()
    expect(line).to_contain_text("set adminKeys (or apiKeys)")
    expect(page.locator("#models")).to_be_hidden()
    expect(page.locator("#key-dialog")).not_to_have_attribute("open", "")
    shot(page, tmp_path, "ui-refused-on-the-lan.png")
    # Only the refused data calls themselves are errors in the console: no script error.
    assert not [e for e in page.errors if "403" not in e], page.errors

    port = free_port()
    daemon = start_swapd({**two_models(), "listen": f":{port}", "apiKeys": ["sk-lan-key"]},
                         port=port)
    page.goto(f"http://{address}:{port}/ui")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", "sk-lan-key")
    page.click("#key-save")
    page.wait_for_selector(card(page, "beta") + "[data-state='stopped']")
    expect(page.locator("#refused")).to_be_hidden()
    page.click(card(page, "beta") + " button.load")
    wait_until(lambda: "beta" in running(daemon), message="beta loaded from the LAN page")
    shot(page, tmp_path, "ui-lan-with-api-key.png")


def shot(page: Any, tmp_path: Any, name: str) -> None:
    page.screenshot(path=str(tmp_path / name))
    shots = os.environ.get("SWAPD_SCREENSHOTS")
    if shots:
        page.screenshot(path=os.path.join(shots, name))


def test_the_usage_panel_shows_todays_requests_and_tokens_per_key_and_model(
    start_swapd, page, tmp_path,
) -> None:
    keys = {"ops": {"key": "ops-k", "role": "operator"},
            "agent": {"key": "agent-k", "models": ["beta"]},
            "tuner": {"key": "tuner-k", "tokensPerDay": 100000}}
    daemon = start_swapd({**two_models(), "keys": keys, "activity": {"store": "sqlite"}})
    for key, name, times in (("agent-k", "beta", 2), ("tuner-k", "alpha", 3)):
        for _ in range(times):
            code, _ = daemon.post("/v1/chat/completions", {"model": name, "messages": []},
                                  headers={"Authorization": f"Bearer {key}"})
            assert code == 200
    page.goto(daemon.url + "/ui")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", "ops-k")
    page.click("#key-save")
    expect(page.locator("#usage-keys tbody")).to_contain_text("tuner")

    def rows(table: str) -> dict[str, list[str]]:
        out = {}
        for row in page.query_selector_all(f"#{table} tbody tr"):
            cells = [c.inner_text() for c in row.query_selector_all("td")]
            out[cells[0]] = cells[1:]
        return out

    # requests, errors, prompt, completion, tokens: the fake engine reports 3 + 4 a request
    # (alpha's --timings do not change its usage).
    assert rows("usage-keys") == {"agent": ["2", "0", "6", "8", "14"],
                                  "ops": ["0", "0", "0", "0", "0"],
                                  "tuner": ["3", "0", "9", "12", "21"]}
    assert rows("usage-models") == {"alpha": ["3", "0", "9", "12", "21"],
                                    "beta": ["2", "0", "6", "8", "14"]}
    expect(page.locator("#activity-rows")).to_contain_text("tuner")
    page.locator("#usage").screenshot(path=str(tmp_path / "ui-usage.png"))
    shots = os.environ.get("SWAPD_SCREENSHOTS")
    if shots:
        page.locator("#usage").screenshot(path=os.path.join(shots, "ui-usage.png"))
    # Only the first requests' 401s, before the key was given.
    assert [e for e in page.errors if "status of 401" not in e] == []
