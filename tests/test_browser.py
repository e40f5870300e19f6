"""The sampling page in a real headless browser (Debian's chromium, driven by Selenium): it streams
text as it is generated, Stop stops the server too, the model panel, a phone-sized window.

`tests/install_browser.sh` (run by `make test`) installs chromium and chromium-driver with
apt-get; without them this test skips and says so. Selenium is pointed at both binaries, so it
never looks for or downloads a browser or driver of its own.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from generation_job import Server, shared_server, trained_job

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# What Chromium needs on a machine without internet (and as root, in a container).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-quic", "--disable-dev-shm-usage", "--window-size=1024,768")

pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason=f"no {CHROMIUM} / {CHROMEDRIVER}: run tests/install_browser.sh as root "
           "(apt-get install chromium chromium-driver)")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = shared_server(trained_job(tmp_path_factory.getbasetemp() / "generation", "char"))
    yield running
    running.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def health(server: Server) -> dict:
    with urllib.request.urlopen(server.url + "/healthz", timeout=60) as response:
        return json.loads(response.read())


def fill_form(browser: object, fields: dict[str, str], mode: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    for name, value in fields.items():
        element = browser.find_element(By.ID, name)
        element.clear()
        element.send_keys(value)
    Select(browser.find_element(By.ID, "sample_mode")).select_by_value(mode)


def output_length(browser: object) -> int:
    return browser.execute_script('const o = document.getElementById("output"); '
                                  "return o ? o.textContent.length : -1;")


def wait_for_state(browser: object, state: str, seconds: float = 120) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, seconds, poll_frequency=0.05).until(
        lambda b: b.execute_script('return document.getElementById("status").dataset.state;') == state)


def wait_for_first_tokens(browser: object, prime: str) -> int:
    """Polls often, so the first text is seen soon after it arrives; returns its length."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, 120, poll_frequency=0.01).until(
        lambda b: (n := output_length(b)) > len(prime) and n)


def test_the_page_streams_text_as_it_is_generated(server: Server, browser: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(server.url + "/ui")
    assert "verne" in browser.title
    length = 2000
    fields = {"prime": "First", "length": str(length), "temperature": "0.5", "top_k": "20", "top_p": "0.95",
              "seed": "5", "num_samples": "2"}
    fill_form(browser, fields, mode="2")
    before = health(server)["generated_tokens"]
    browser.find_element(By.ID, "submit").click()
    first = wait_for_first_tokens(browser, "First")
    generated = health(server)["generated_tokens"] - before
    assert generated < 2 * length, "text was on the page before the last token was generated"
    wait_for_state(browser, "done")
    shown = [browser.find_element(By.ID, i).get_attribute("textContent") for i in ("output", "output-2")]
    assert first < len(shown[0]), (first, len(shown[0]))

    request = urllib.request.Request(
        server.url + "/v1/generate", headers={"Content-Type": "application/json"},
        data=json.dumps({"prime": "First", "length": length, "temperature": 0.5, "top_k": 20, "top_p": 0.95,
                         "sample_mode": 2, "seed": 5, "num_samples": 2}).encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        expected = json.loads(response.read())["samples"]
    assert shown == expected and shown[0].startswith("First")
    assert "seed 5" in browser.find_element(By.ID, "status").text
    # The form keeps what was asked, so the next request starts from it.
    assert browser.find_element(By.ID, "seed").get_attribute("value") == "5"
    mode = Select(browser.find_element(By.ID, "sample_mode")).first_selected_option
    assert mode.get_attribute("value") == "2"


def test_stop_ends_generation(server: Server, browser: object) -> None:
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/ui")
    fill_form(browser, {"prime": "All", "length": "2000", "seed": "9", "num_samples": "1"}, mode="1")
    before = health(server)["generated_tokens"]
    browser.find_element(By.ID, "submit").click()
    wait_for_first_tokens(browser, "All")
    browser.find_element(By.ID, "stop").click()
    wait_for_state(browser, "stopped")
    stopped_at = output_length(browser)
    settled = health(server)["generated_tokens"]
    for _ in range(60):  # until the server has stopped too
        time.sleep(0.5)
        settled, previous = health(server)["generated_tokens"], settled
        if settled == previous:
            break
    assert settled - before < 2000, f"{settled - before} tokens: the server went on after Stop"
    assert output_length(browser) == stopped_at < len("All") + 2000
    assert browser.find_element(By.ID, "stop").get_attribute("disabled")


def test_the_model_panel_and_a_phone_sized_window(server: Server, browser: object) -> None:
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/ui")
    facts = {e.get_attribute("id"): e.text for e in browser.find_elements(By.CSS_SELECTOR, "#facts dd")}
    assert facts["fact-cell"] == "lstm" and facts["fact-layers"] == "2 × 32"
    assert facts["fact-tokenizer"].startswith("char, vocabulary ") and facts["fact-step"] == "30"
    assert "nats/token" in facts["fact-validation"] and "bits/char" in facts["fact-validation"]
    assert facts["fact-runs"].startswith("TensorFlow kernels")
    browser.set_window_size(390, 844)
    browser.get(server.url + "/ui")
    width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth];")
    assert width[0] <= width[1], f"the page is wider than a phone's screen: {width}"
