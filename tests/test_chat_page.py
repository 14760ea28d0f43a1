"""chat.html in a real headless Chromium (through selenium) against a real serve.py on a free
127.0.0.1 port; skipped where Chromium, its driver or selenium is missing."""
import importlib.util
import shutil
import time

import pytest

import serve
from generate import fit_context
from prompts import encode_conversation
from test_serve import model, reference, running  # noqa: F401 (model: a fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None or importlib.util.find_spec("selenium") is None,
                                reason="needs Chromium, chromedriver and selenium (apt-get install chromium "
                                       "chromium-driver; pip install selenium)")
MAX_TOKENS = 12


@pytest.fixture
def server(model, monkeypatch):
    """A server whose parse_request records each request body it is given (server.bodies)."""
    bodies = []
    parse_request = serve.parse_request
    monkeypatch.setattr(serve, "parse_request",
                        lambda body, *args: (bodies.append(body), parse_request(body, *args))[1])
    with running(model, api_key=None) as server:
        server.bodies = bodies
        yield server


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(condition, timeout=60):
    """Wait until condition() is true (its value), failing after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)
    return value


def open_page(browser, server, max_tokens=MAX_TOKENS):
    browser.get(f"http://127.0.0.1:{server.port}/")
    field = browser.find_element("id", "max-tokens")
    field.clear()
    if max_tokens is not None:
        field.send_keys(str(max_tokens))


def say(browser, text):
    from selenium.webdriver.common.keys import Keys
    box = browser.find_element("id", "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def replies(browser):
    """The text of each assistant bubble, as it is (textContent: no trimming)."""
    return browser.execute_script("return [...document.querySelectorAll('.msg.assistant .text')]"
                                  ".map((e) => e.textContent)")


def idle(browser):
    return browser.find_element("id", "send").is_enabled()


def chat_bodies(server):
    return [b for b in server.bodies if "messages" in b and "stream" in b]


def test_the_empty_page_has_a_hint_an_inline_favicon_and_one_line_buttons(browser, server):
    open_page(browser, server)
    hint = browser.find_element("id", "hint")
    assert hint.is_displayed() and "Enter sends" in hint.text
    assert browser.execute_script("return document.querySelector('link[rel=icon]').href").startswith("data:image/svg")
    assert browser.get_window_size()["width"] == 1200
    for button in ("new-chat", "send"):  # its text is one line box: it does not wrap
        assert browser.execute_script(f"const r = document.createRange(); r.selectNodeContents("
                                      f"document.getElementById('{button}')); return r.getClientRects().length") == 1
    title, new_chat = (browser.find_element("css selector", s).rect for s in ("h1", "#new-chat"))
    assert new_chat["y"] < title["y"] + title["height"]  # the header is one row: New chat beside the title
    say(browser, "Name a color.")
    wait(lambda: replies(browser) and idle(browser))
    assert not hint.is_displayed()
    browser.find_element("id", "new-chat").click()
    assert hint.is_displayed() and replies(browser) == []


def test_a_conversation_streams_greedy_replies_and_copies_them(browser, server, model):
    open_page(browser, server)
    conversation = []
    for text in ("Name a color.", "And another?"):
        say(browser, text)
        wait(lambda: len(replies(browser)) == len(conversation) // 2 + 1 and idle(browser))
        conversation.append({"role": "user", "content": text})
        expected = reference(model, encode_conversation(conversation, "alpaca")[0], MAX_TOKENS)
        assert replies(browser)[-1] == expected
        assert chat_bodies(server)[-1]["messages"] == conversation and chat_bodies(server)[-1]["max_tokens"] == 12
        conversation.append({"role": "assistant", "content": expected})
    browser.execute_script("window.copied = []; navigator.clipboard.writeText = async (t) => { copied.push(t); };")
    browser.find_elements("css selector", ".msg.assistant .copy")[0].click()
    assert wait(lambda: browser.execute_script("return window.copied")) == [conversation[1]["content"]]


def test_stop_keeps_what_was_made_and_frees_the_row(browser, server, model, monkeypatch):
    step = server.engine.step
    monkeypatch.setattr(server.engine, "step", lambda: (time.sleep(0.05), step()))  # slow enough to stop by hand
    open_page(browser, server, max_tokens=100)
    say(browser, "Tell a long story.")
    wait(lambda: len((replies(browser) or [""])[-1]) > 10)
    browser.find_element("id", "stop").click()
    wait(lambda: idle(browser))
    kept = replies(browser)[-1]
    full = reference(model, encode_conversation([{"role": "user", "content": "Tell a long story."}], "alpaca")[0], 100)
    assert kept and full.startswith(kept) and len(kept) < len(full)
    assert "(reply stopped)" in browser.find_element("css selector", ".msg.assistant").text
    wait(lambda: server.engine.stats()["running"] == 0, timeout=10)  # the page hung up: the row is free
    say(browser, "Go on.")
    wait(lambda: len(replies(browser)) == 2 and idle(browser))
    assert chat_bodies(server)[-1]["messages"][1] == {"role": "assistant", "content": kept}


def test_a_stop_before_any_reply_leaves_the_exchange_out(browser, server, monkeypatch):
    """Stopped before a token came (the prompt still being counted, or the first step slow): no
    empty assistant turn joins the conversation; the message goes back to the input box."""
    step = server.engine.step
    monkeypatch.setattr(server.engine, "step", lambda: (time.sleep(1.0), step()))
    open_page(browser, server)
    say(browser, "Tell a long story.")
    browser.find_element("id", "stop").click()
    wait(lambda: idle(browser))
    assert replies(browser) == [""]
    assert "(stopped before any reply; this exchange is left out of the conversation)" in browser.find_element(
        "css selector", ".msg.assistant").text
    box = browser.find_element("id", "input")
    assert box.get_attribute("value") == "Tell a long story."
    box.clear()
    monkeypatch.setattr(server.engine, "step", step)
    say(browser, "Name a color.")
    wait(lambda: len(replies(browser)) == 2 and idle(browser))
    assert chat_bodies(server)[-1]["messages"] == [{"role": "user", "content": "Name a color."}]


def test_an_empty_max_tokens_is_the_servers_default_and_regenerate_asks_again(browser, server, model):
    open_page(browser, server, max_tokens=None)
    say(browser, "Name a color.")
    wait(lambda: replies(browser) and idle(browser))
    first = chat_bodies(server)[-1]
    assert "max_tokens" not in first and "error" not in browser.find_element("id", "log").text
    prompt = encode_conversation(first["messages"], "alpaca")[0]
    assert replies(browser) == [reference(model, prompt, 128)]  # to the end of the context (or <|endoftext|>)
    browser.find_element("css selector", ".regenerate").click()
    wait(lambda: len(chat_bodies(server)) == 2 and idle(browser))
    again = chat_bodies(server)[-1]
    assert again["messages"] == first["messages"] and again["seed"] != first["seed"]  # another sample
    assert len(browser.find_elements("css selector", ".msg")) == 2  # the old reply was replaced


def test_the_api_key_is_kept_across_a_reload(browser, model):
    with running(model, api_key="sesame") as server:
        open_page(browser, server)
        browser.find_element("id", "api-key").send_keys("sesame")
        browser.refresh()
        assert browser.find_element("id", "api-key").get_attribute("value") == "sesame"
        say(browser, "Name a color.")
        wait(lambda: replies(browser) and idle(browser))
        assert "error" not in browser.find_element("id", "log").text


def test_the_oldest_exchanges_are_dropped_when_the_context_fills(browser, server, model):
    """At a context of 128 tokens the third message no longer fits with room for a reply: the
    page drops the oldest exchanges as generate.py --interactive does (fit_context) and says so."""
    open_page(browser, server, max_tokens=20)
    conversation, ctx = [], model.config.context_length
    for k, text in enumerate(["Describe the color of the sky on a clear summer day in detail."] * 4):
        say(browser, text)
        wait(lambda: len(browser.find_elements("css selector", ".msg.assistant")) == k + 1 and idle(browser))
        sent = chat_bodies(server)[-1]["messages"]
        expected, _, dropped = fit_context(conversation + [{"role": "user", "content": text}], "alpaca", ctx, 20)
        assert sent == expected and "error" not in browser.find_element("id", "log").text
        conversation = sent + [{"role": "assistant", "content": reference(
            model, encode_conversation(sent, "alpaca")[0], 20)}]
    assert dropped and f"dropped from the conversation to fit the model's context of {ctx} tokens" in \
        browser.find_element("id", "log").text
    assert browser.find_elements("css selector", ".msg.dropped")
