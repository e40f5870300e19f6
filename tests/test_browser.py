"""The sampling page in a real headless browser (Debian's chromium, driven by Selenium).

`tests/install_browser.sh` (run by `make test`) installs chromium and chromium-driver with
apt-get; without them this test skips and says so. Selenium is pointed at both binaries, so it
never looks for or downloads a browser or driver of its own.
"""

from __future__ import annotations

import json
import os
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


def test_the_page_generates_text_from_the_form(server: Server, browser: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server.url + "/ui")
    assert "verne" in browser.title
    fields = {"prime": "First", "length": "30", "temperature": "0.5", "seed": "5"}
    for name, value in fields.items():
        element = browser.find_element(By.ID, name)
        element.clear()
        element.send_keys(value)
    Select(browser.find_element(By.ID, "sample_mode")).select_by_value("2")
    browser.find_element(By.ID, "submit").click()
    located = expected_conditions.presence_of_element_located((By.ID, "output"))
    output = WebDriverWait(browser, 120).until(located)
    shown = output.get_attribute("textContent")

    request = urllib.request.Request(
        server.url + "/v1/generate", headers={"Content-Type": "application/json"},
        data=json.dumps({"prime": "First", "length": 30, "temperature": 0.5, "sample_mode": 2,
                         "seed": 5}).encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        expected = json.loads(response.read())["samples"][0]
    assert shown == expected and shown.startswith("First")
    # The form keeps what was asked, so the next request starts from it.
    assert browser.find_element(By.ID, "seed").get_attribute("value") == "5"
    mode = Select(browser.find_element(By.ID, "sample_mode")).first_selected_option
    assert mode.get_attribute("value") == "2"
