"""The built site in headless Chromium (Debian's chromium and chromium-driver, through
selenium), served over HTTP from 127.0.0.1 (search needs it): the home page renders, and the
search finds `generate` and `from_preset` on the pages that document them. Screenshots of the
home page and an API page are saved in the test's temporary folder."""

import functools
import http.server
import threading

import pytest

from tests.browser import headless_chromium


@pytest.fixture(scope="module")
def site_url(built_site):
    returncode, output, site = built_site
    assert returncode == 0, output[-3000:]
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(timeout=10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser():
    with headless_chromium(1400, 1000) as driver:
        yield driver


def search(browser, site_url, query):
    """The result links (href, text) the search box lists for ``query``, once the list has
    settled (the page re-renders it after every typed key: elements read one by one could
    belong to a list already replaced, so each read takes the whole list in one script)."""
    import time

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(site_url + "/")
    box = WebDriverWait(browser, 20).until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, "input.md-search__input"))
    )
    box.click()
    box.send_keys(query)
    script = (
        "return Array.from(document.querySelectorAll('.md-search-result__item a'))"
        ".map(a => [a.href, a.innerText]);"
    )
    previous, deadline = None, time.monotonic() + 30
    while time.monotonic() < deadline:
        results = [tuple(r) for r in browser.execute_script(script)]
        if results and results == previous:  # the same list twice, 0.3 s apart
            return results
        previous = results
        time.sleep(0.3)
    return previous or []


def test_home_page_renders(browser, site_url, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(site_url + "/")
    assert "keras-llama" in browser.title
    assert browser.find_element(By.CSS_SELECTOR, "article h1").text == "keras-llama"
    browser.save_screenshot(str(tmp_path / "home.png"))
    browser.get(site_url + "/api/models/")
    heading = browser.find_element(By.ID, "keras_llama.models.LlamaCausalLM")
    assert "LlamaCausalLM" in heading.text
    browser.save_screenshot(str(tmp_path / "api_models.png"))
    assert (tmp_path / "home.png").stat().st_size > 10_000


@pytest.mark.parametrize("query,expected_page",
                         [("generate", "guides/generation/"), ("from_preset", "api/models/")])  # fmt: skip
def test_search_finds(browser, site_url, query, expected_page):
    results = search(browser, site_url, query)
    hrefs = [href for href, _ in results]
    assert any(expected_page in href for href in hrefs), results
    assert any(query in text for _, text in results), results
