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
