"""serve.py's chat page (GET /) in a real browser: headless Chromium (Debian's `chromium`, which .ci/run installs)
driven by Playwright. A question typed into the page streams back the answer the API gives the same question
greedily; a second one goes out with the first turn as history; Clear empties the page; with an API key set, the
page asks for it. A screenshot is kept in test-artifacts/chat_page.png."""
import os
import shutil

import pytest

from conftest import ROOT
from test_serve import API_KEY, QUERIES, ask, serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# what Chromium needs as root on a machine with no display and no network (the browser's own services are off)
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = os.path.join(ROOT, "test-artifacts")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def page_server(family_model_dirs):
    yield from serving(family_model_dirs["chatglm2"])


@pytest.fixture(scope="module")
def keyed_server(family_model_dirs):
    yield from serving(family_model_dirs["chatglm2"], "--api_key", API_KEY)


@pytest.fixture
def browser_page():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        yield page
        browser.close()


def send(page, text):
    """Type `text`, send it, wait for its reply to end; returns the reply's text."""
    replies = page.locator("[data-state]")
    count = replies.count()
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_function("n => { const r = document.querySelectorAll('[data-state]')[n]; "
                           "return r && r.dataset.state !== 'streaming'; }", arg=count, timeout=60_000)
    reply = replies.nth(count)
    assert reply.get_attribute("data-state") == "done", reply.text_content()
    return reply.text_content()


def test_the_chat_page_streams_the_apis_greedy_answers_with_history(page_server, browser_page):
    page = browser_page
    page.goto(page_server)
    page.wait_for_function("document.querySelector('#model-info').textContent.includes('tiny')")
    assert "chat format" in page.text_content("#model-info")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "24")
    first = send(page, QUERIES[0])
    assert first and first == ask(page_server, QUERIES[0], max_tokens=24)[0]
    # the second turn carries the first as history: the answer the API gives that conversation
    second = send(page, QUERIES[1])
    from test_serve import client
    expected = client(page_server).chat.completions.create(
        model="tiny", temperature=0, max_tokens=24, messages=[
            {"role": "user", "content": QUERIES[0]}, {"role": "assistant", "content": first},
            {"role": "user", "content": QUERIES[1]}]).choices[0].message.content
    assert second == expected
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "chat_page.png"))
    page.click("#clear")
    assert page.locator(".message").count() == 0


def test_the_chat_page_asks_for_the_api_key_and_sends_it(keyed_server, browser_page):
    page = browser_page
    page.goto(keyed_server)
    page.wait_for_selector("#api-key-field:not([hidden])")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "8")
    page.fill("#prompt", QUERIES[2])
    page.click("#send")
    page.wait_for_selector(".message.error", timeout=60_000)
    assert "API key" in page.text_content(".message.error")
    page.fill("#api_key", API_KEY)
    assert send(page, QUERIES[2]) == ask(keyed_server, QUERIES[2], API_KEY, max_tokens=8)[0]
