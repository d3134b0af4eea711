"""The chat page in a real headless Chromium against a real ``--mode=serve`` process.

Why a browser: the API tests cannot see what the page does with it (that a
thumbs down with a reason reaches the chunk files, that user text is never
parsed as HTML). Skips without Debian's chromium and chromium-driver, unless
BB3X_REQUIRE_BROWSER=1 (CI, after installing them), where it fails instead.
"""

from __future__ import annotations

import glob
import json
import os
import time

import pytest

from tests.deploy.conftest import Server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# No sandbox (containers), no GPU, and nothing that reaches the network on its own.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--window-size=1000,560")  # short: replies and reasons need scrolling
WAIT_S = 60
REASONS = ["inappropriate", "nonsensical", "off_topic", "ignoring_last_turn", "repeating", "other"]
HTML_TEXT = "<img src=x onerror=alert(1)><b>bold</b>"


@pytest.fixture(scope="session")  # session: decided before the session's trained workdir is made
def browser_available():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        why = f"{' and '.join(missing)} missing (apt-get install chromium chromium-driver)"
        if os.environ.get("BB3X_REQUIRE_BROWSER") == "1":
            pytest.fail(f"BB3X_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def server(browser_available, trained_workdir, tmp_path_factory):
    """One server for the module (what the ``serve`` fixture starts), recording into its own folder."""
    folder = str(tmp_path_factory.mktemp("page_deployment"))
    server = Server(trained_workdir, f"--config.serve.folder={folder}")
    server.folder = folder
    yield server
    if server.process.poll() is None:
        assert server.stop() == -15, server.output()


@pytest.fixture
def driver(browser_available, tmp_path, monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager, were it ever reached, downloads nothing
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(WAIT_S)
    yield browser
    browser.quit()


def wait(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: condition(d), message)


def conversation_id(driver) -> str | None:
    return driver.execute_script("return state.conversationId")


def open_page(driver, server):
    driver.get(server.url + "/")
    wait(driver, conversation_id, "the page never started a conversation")


def chat(driver, text: str):
    """Types ``text``, presses Send, and returns the bot message element of the reply."""
    from selenium.webdriver.common.by import By

    before = len(driver.find_elements(By.CSS_SELECTOR, "#messages .message.bot"))
    driver.find_element(By.ID, "input").send_keys(text)
    driver.find_element(By.ID, "send").click()
    bots = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .message.bot")[before:],
                f"no reply to {text!r}; status: {driver.find_element(By.ID, 'status').text!r}")
    return bots[0]


def clear_of_composer(driver, element) -> bool:
    """The element is in the window and not under the message box stuck to the window's bottom."""
    return driver.execute_script(
        "const box = arguments[0].getBoundingClientRect();"
        "return box.top >= 0 && box.bottom <= document.getElementById('composer').getBoundingClientRect().top;",
        element)


def recorded(folder: str, message_id: str, condition=lambda record, message: True, timeout_s: float = 30):
    """(conversation record, bot message) of ``message_id`` in the chunk files, once ``condition`` holds."""
    deadline, found = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        for path in sorted(glob.glob(os.path.join(folder, "release_data_*.jsonl"))):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    record = json.loads(line)
                    for message in record["message_history"]:
                        if message.get("bot_message_id") == message_id:
                            found = record, message
                            if condition(record, message):
                                return found
        time.sleep(0.2)
    raise AssertionError(f"bot message {message_id} not recorded as expected within {timeout_s} s: {found}")


def test_thumbs_down_with_a_reason_and_thumbs_up_are_recorded(server, driver):
    from selenium.webdriver.common.by import By

    open_page(driver, server)
    first = chat(driver, "hello, do you like hiking?")
    text, message_id = first.find_element(By.CSS_SELECTOR, ".text").text, first.get_attribute("data-message-id")
    form = first.find_element(By.CSS_SELECTOR, ".reasons")
    assert not form.is_displayed()
    first.find_element(By.CSS_SELECTOR, ".dislike").click()
    wait(driver, lambda d: form.is_displayed(), "thumbs down did not open the reasons")
    assert clear_of_composer(driver, form), "the reasons opened out of sight"
    radios = form.find_elements(By.CSS_SELECTOR, "input[type=radio]")
    assert [r.get_attribute("value") for r in radios] == REASONS
    form.find_element(By.CSS_SELECTOR, "input[value=nonsensical]").click()
    form.find_element(By.CSS_SELECTOR, ".submit-reason").click()
    wait(driver, lambda d: not form.is_displayed(), "the reasons form stayed open after submitting")
    assert first.find_element(By.CSS_SELECTOR, ".rated").text == "Thanks for the feedback."
    assert first.find_element(By.CSS_SELECTOR, ".dislike").get_attribute("aria-pressed") == "true"

    second = chat(driver, "what is your favourite food?")
    second_id = second.get_attribute("data-message-id")
    assert clear_of_composer(driver, second), "the reply arrived out of sight"
    second.find_element(By.CSS_SELECTOR, ".like").click()
    wait(driver, lambda d: second.find_element(By.CSS_SELECTOR, ".rated").text == "Thanks!", "no thanks for a like")

    record, message = recorded(server.folder, message_id, lambda r, m: m["isDisliked"])
    assert (message["text"], message["isDisliked"], message["isLiked"], message["dislike_type"]) == \
        (text, True, False, "nonsensical")
    _, liked = recorded(server.folder, second_id, lambda r, m: m["isLiked"])
    assert (liked["isLiked"], liked["isDisliked"], liked["dislike_type"]) == (True, False, "")
    assert [m["sender"] for m in record["message_history"]][:2] == ["human", "bot"]
    assert record["message_history"][0]["text"] == "hello, do you like hiking?"


def test_html_in_a_message_is_shown_as_text(server, driver):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    open_page(driver, server)
    reply = chat(driver, HTML_TEXT)
    assert driver.find_elements(By.CSS_SELECTOR, "#messages img, #messages b") == []
    human = driver.find_elements(By.CSS_SELECTOR, "#messages .message.human")
    assert [h.get_property("textContent") for h in human] == [HTML_TEXT]
    assert human[0].text == HTML_TEXT  # rendered verbatim, not just present in the DOM
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text
    record, _ = recorded(server.folder, reply.get_attribute("data-message-id"))
    assert record["message_history"][0]["text"] == HTML_TEXT


def test_new_conversation_clears_the_view_and_starts_another(server, driver):
    from selenium.webdriver.common.by import By

    open_page(driver, server)
    first_message = chat(driver, "good morning").get_attribute("data-message-id")
    first_id = conversation_id(driver)
    driver.find_element(By.ID, "new-conversation").click()
    wait(driver, lambda d: conversation_id(d) not in (None, first_id), "no new conversation id")
    assert driver.find_elements(By.CSS_SELECTOR, "#messages > *") == []
    second_reply = chat(driver, "good evening")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#messages .message")) == 2

    first, _ = recorded(server.folder, first_message)
    second, _ = recorded(server.folder, second_reply.get_attribute("data-message-id"))
    assert first["chat_id"] != second["chat_id"]
    assert first["user_pseudo_id"] == second["user_pseudo_id"]  # the same browser: the same pseudonym
    assert [m["text"] for m in second["message_history"] if m["sender"] == "human"] == ["good evening"]
