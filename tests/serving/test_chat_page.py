"""The chat page answers a question in a real headless Chromium (Debian's chromium and
chromium-driver, driven by selenium); the answer equals the API's greedy answer."""

import os

import pytest

from tests.browser import headless_chromium
from tests.serving.conftest import MODEL_NAME


@pytest.fixture(scope="module")
def browser():
    with headless_chromium(900, 700) as driver:
        yield driver


def test_the_chat_page_answers_in_headless_chromium(browser, served, client, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    question = "hello there"
    expected = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": question}], temperature=0,
        max_tokens=20,
    ).choices[0].message.content  # fmt: skip
    browser.get(served[0] + "/")
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    browser.find_element(By.ID, "max-tokens").send_keys("20")
    assert MODEL_NAME in browser.find_element(By.ID, "model").text
    box = browser.find_element(By.ID, "input")
    box.send_keys(question)
    box.send_keys(Keys.ENTER)
    wait = WebDriverWait(browser, 60, poll_frequency=0.1)
    reply = wait.until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']")
    )[0]  # fmt: skip
    assert reply.text == expected.strip() and expected.strip()
    # The conversation is kept: a second question shows both turns.
    box.send_keys("and then?" + Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']")) == 2)
    users = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".user")]
    assert users == [question, "and then?"]
    path = os.environ.get("KERAS_LLAMA_SCREENSHOT") or str(tmp_path / "chat_page.png")
    browser.save_screenshot(path)


def test_the_stop_button_aborts_and_frees_the_slot(browser, served):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.serving.test_engine import slow_steps, wait_until

    browser.get(served[0] + "/")
    with slow_steps(served[1], 0.1) as engine:
        browser.find_element(By.ID, "input").send_keys("tell her" + Keys.ENTER)
        assert wait_until(lambda: engine.occupancy()[0] == 1, timeout=30)
        browser.find_element(By.ID, "stop").click()
        WebDriverWait(browser, 30).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']")
        )
        assert wait_until(lambda: engine.occupancy() == (0, 0), timeout=10)
