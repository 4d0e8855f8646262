"""The web chat page in real headless Chromium (Debian's chromium + chromedriver, driven by selenium)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.api.conftest import API_KEY, png_bytes

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1200,900", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait_done(driver, count: int, timeout: float = 90) -> list:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def done(d):
        bubbles = d.find_elements(By.CSS_SELECTOR, ".message.assistant")
        return bubbles if len(bubbles) >= count and bubbles[count - 1].get_attribute("data-state") == "done" else False

    return WebDriverWait(driver, timeout).until(done)


def _wait_images(driver, bubble, timeout: float = 30) -> list:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def loaded(d):
        imgs = bubble.find_elements(By.CSS_SELECTOR, "img.artifact")
        ok = imgs and all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
                          for i in imgs)
        return imgs if ok else False

    return WebDriverWait(driver, timeout).until(loaded)


@pytest.mark.browser
@pytest.mark.timeout(300)
def test_chat_with_an_image(server, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    picture = tmp_path / "picture.png"
    picture.write_bytes(png_bytes((100, 60), (220, 40, 40)))
    browser.get(server.url + "/")
    assert browser.title == "Switchboard"

    # without a key the server refuses, and the page says so
    browser.find_element(By.ID, "message").send_keys("hi", Keys.ENTER)
    bubble = _wait_done(browser, 1)[0]
    assert "API key" in bubble.find_element(By.CSS_SELECTOR, ".error").text

    # enter the key, attach an image, ask
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    browser.find_element(By.ID, "file").send_keys(str(picture))
    assert browser.find_elements(By.CSS_SELECTOR, "#attachments img")
    browser.find_element(By.ID, "message").send_keys("crop the top left")
    browser.find_element(By.ID, "send").click()

    bubble = _wait_done(browser, 2)[1]
    assert "Here is the crop." in bubble.find_element(By.CSS_SELECTOR, ".answer").text
    stages = [li.get_attribute("data-stage") for li in bubble.find_elements(By.CSS_SELECTOR, ".stages li")]
    assert stages[:2] == ["planning", "executing"] and stages[-2:] == ["answering", "done"]
    call = bubble.find_element(By.CSS_SELECTOR, "li.call")
    assert call.get_attribute("data-stage") == "done" and "c1 · crop: done" in call.text
    assert "<call" in bubble.find_element(By.CSS_SELECTOR, "pre.plan").get_attribute("textContent")
    (img,) = _wait_images(browser, bubble)
    assert browser.execute_script("return arguments[0].naturalWidth", img) == 50
    assert img.get_attribute("src").startswith("blob:")
    conversation = browser.find_element(By.ID, "conversation").text
    assert conversation.startswith("conv-")

    # the next turn continues the conversation: "crop that again" works on the crop
    browser.find_element(By.ID, "message").send_keys("now crop that again", Keys.ENTER)
    bubble = _wait_done(browser, 3)[2]
    (img,) = _wait_images(browser, bubble)
    assert browser.execute_script("return arguments[0].naturalWidth", img) == 25
    assert browser.find_element(By.ID, "conversation").text == conversation

    SHOTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(SHOTS / "api-chat-page.png"))
    assert (SHOTS / "api-chat-page.png").stat().st_size > 1000
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]]
    assert not severe, severe  # no script errors, no CSP violations


def _open(browser, url: str) -> None:
    browser.get(url + "/")
    assert browser.title == "Switchboard"


def _attach_and_ask(browser, picture: Path, text: str) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "file").send_keys(str(picture))
    browser.find_element(By.ID, "message").send_keys(text)
    browser.find_element(By.ID, "send").click()


@pytest.mark.browser
@pytest.mark.timeout(300)
def test_typed_key_progress_bars_and_a_reload_keeps_the_conversation(server, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    picture = tmp_path / "picture.png"
    picture.write_bytes(png_bytes((100, 60), (220, 40, 40)))
    _open(browser, server.url)

    # a key typed but not saved is the one used
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    _attach_and_ask(browser, picture, "crop the top left")
    bubble = _wait_done(browser, 1)[0]
    assert "Here is the crop." in bubble.find_element(By.CSS_SELECTOR, ".answer").text
    assert not bubble.find_elements(By.CSS_SELECTOR, ".error")
    assert browser.execute_script("return localStorage.getItem('switchboard.apiKey')") is None
    assert browser.find_element(By.ID, "key-status").text == "used, not saved"

    # the call kept its progress bar (filled once done) and its progress messages
    call = bubble.find_element(By.CSS_SELECTOR, "li.call")
    bar = call.find_element(By.TAG_NAME, "progress")
    assert bar.get_attribute("value") == "1" and bar.get_attribute("data-state") == "done"
    assert [li.text for li in call.find_elements(By.CSS_SELECTOR, ".call-log li")] == ["100% crop 1"]
    (img,) = _wait_images(browser, bubble)
    conversation = browser.find_element(By.ID, "conversation").text
    assert conversation.startswith("conv-")

    # save the key and reload: the conversation is still there, artifacts included
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    browser.refresh()
    bubble = _wait_done(browser, 1)[0]
    assert browser.find_element(By.ID, "conversation").text == conversation
    assert browser.find_element(By.CSS_SELECTOR, ".message.user .text").text == "crop the top left"
    assert browser.find_elements(By.CSS_SELECTOR, ".message.user img.thumb")
    assert "Here is the crop." in bubble.find_element(By.CSS_SELECTOR, ".answer").text
    assert "c1 · crop: done" in bubble.find_element(By.CSS_SELECTOR, "li.call").text
    (img,) = _wait_images(browser, bubble)
    assert browser.execute_script("return arguments[0].naturalWidth", img) == 50

    # and it goes on where it was: the server's conversation, the same crop
    browser.find_element(By.ID, "message").send_keys("now crop that again", Keys.ENTER)
    bubble = _wait_done(browser, 2)[1]
    (img,) = _wait_images(browser, bubble)
    assert browser.execute_script("return arguments[0].naturalWidth", img) == 25
    assert browser.find_element(By.ID, "conversation").text == conversation
    browser.refresh()
    assert len(_wait_done(browser, 2)) == 2

    # a new chat forgets it, also across a reload
    browser.find_element(By.ID, "new-chat").click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".message")
    browser.refresh()
    assert browser.find_element(By.ID, "conversation").text == "new conversation"
    assert not browser.find_elements(By.CSS_SELECTOR, ".message")
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


@pytest.fixture
def slow_server(tmp_path: Path):
    """A server whose core writes one character per 20 ms (and honours should_stop), for the stop button."""
    from experts.crop import CropExpert
    from orchestrator.api.app import create_app
    from orchestrator.core.loop import Assistant
    from orchestrator.dispatch import LocalDispatcher
    from orchestrator.session import ConversationStore
    from switchboard.artifacts import ArtifactStore
    from switchboard.registry import Registry
    from tests.api.conftest import LiveServer, make_settings
    from tests.api.test_bounded import chatty
    from tests.orchestrator.core.test_bounded import DecodingCore

    settings = make_settings(tmp_path)
    core = DecodingCore(chatty, step_s=0.02)
    registry = Registry()
    registry.register(CropExpert, "switchboard")
    store = ArtifactStore.from_settings(settings)
    assistant = Assistant(core, registry, store, LocalDispatcher(registry, store),
                          ConversationStore.from_settings(settings), max_new_tokens=1000)
    with LiveServer(create_app(settings, assistant=assistant)) as live:
        yield live, core
    assistant.dispatcher.close()


@pytest.mark.browser
@pytest.mark.timeout(300)
def test_the_stop_button_cancels_the_turn(slow_server, browser) -> None:
    import time

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, core = slow_server
    _open(browser, server.url)
    stop = browser.find_element(By.ID, "stop")
    assert not stop.is_displayed()
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    browser.find_element(By.ID, "message").send_keys("write an essay")
    browser.find_element(By.ID, "send").click()
    bubble = browser.find_element(By.CSS_SELECTOR, ".message.assistant")
    # the core is writing (its text shows up as the plan): stop it
    WebDriverWait(browser, 30).until(lambda d: "Circles" in bubble.find_element(By.CSS_SELECTOR, "pre.plan")
                                     .get_attribute("textContent"))
    assert stop.is_displayed() and not browser.find_element(By.ID, "send").is_enabled()
    stop.click()
    started = time.monotonic()
    _wait_done(browser, 1, timeout=10)
    assert time.monotonic() - started < 5  # the whole essay would take ~15 s
    assert bubble.find_element(By.CSS_SELECTOR, ".stopped").text == "stopped"
    assert not bubble.find_elements(By.CSS_SELECTOR, ".error")
    assert not stop.is_displayed() and browser.find_element(By.ID, "send").is_enabled()
    # the server saw the connection close and stopped decoding
    deadline = time.monotonic() + 10
    while not core.stopped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert core.stopped, "the server went on decoding after the page stopped the turn"
    # a reload shows the stopped turn as stopped
    browser.refresh()
    bubble = _wait_done(browser, 1)[0]
    assert bubble.find_element(By.CSS_SELECTOR, ".stopped").text == "stopped"
