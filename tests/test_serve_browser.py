"""The gallery page of `featshard serve` in real headless Chromium (Debian's chromium + chromium-driver, selenium).

Upload a stored image -> it is the first result; click another result -> its neighbours, led by itself; the
duplicates view; no console errors; every thumbnail loaded. Leaves a screenshot (gallery.png) in the test's folder.
Needs /usr/bin/chromium and /usr/bin/chromedriver: `make install` / .ci/run install them; without them this module
fails (it is not skipped) unless FEATSHARD_ALLOW_NO_BROWSER=1 says a machine may lack them.
"""
from __future__ import annotations

import os
import shutil

import pytest
from helpers import FAST, cli, make_images, mobilenet_weights, write_list
from serverproc import Server

pytestmark = pytest.mark.slow
CHROMIUM = os.environ.get("FEATSHARD_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FEATSHARD_CHROMEDRIVER", "/usr/bin/chromedriver")
N = 6


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("gallery")
    images = make_images(base / "imgs", N, seed=3)
    write_list(base / "list.txt", images)
    cli("run", "--input", str(base / "list.txt"), "--out", str(base / "run"), *FAST, "--gpus", "cpu",
        "--weights", mobilenet_weights(), check=True)
    cli("merge", str(base / "run"), check=True)
    srv = Server(base / "run", log_path=base / "serve.log").start()
    yield srv, images, base
    assert srv.stopped_cleanly(), srv.read_log()[-3000:]


@pytest.fixture(scope="module")
def browser(site):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        if os.environ.get("FEATSHARD_ALLOW_NO_BROWSER") == "1":
            pytest.skip("no chromium/chromedriver here (FEATSHARD_ALLOW_NO_BROWSER=1)")
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: apt-get install chromium chromium-driver "
                    "(make install does it as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _, _, base = site
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,900",
                 f"--user-data-dir={base / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(base / "chromedriver.log")),
                              options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def cards(driver, root: str = "#results") -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, f"{root} .card")


def all_thumbs_loaded(driver) -> bool:
    return driver.execute_script(
        "return [...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)")


def test_upload_click_neighbours_and_duplicates(site, browser):
    from selenium.webdriver.common.by import By

    server, images, base = site
    browser.get(server.url + "/")
    wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    assert f"{N} images · mobilenet_v2" in browser.find_element(By.ID, "info").text

    browser.find_element(By.ID, "file").send_keys(str(images[2]))  # upload a stored image
    wait_for(browser, lambda d: "results for" in d.find_element(By.ID, "status").text)
    found = cards(browser)
    assert len(found) == N and found[0].get_attribute("data-id") == "2"  # the query is its own first result
    assert found[0].find_element(By.CSS_SELECTOR, ".score").text == "1.0000"
    assert found[0].find_element(By.CSS_SELECTOR, ".name").text == images[2].name
    assert str(images[2]) in found[0].get_attribute("title")  # the full stored name
    wait_for(browser, all_thumbs_loaded)
    browser.save_screenshot(str(base / "gallery.png"))

    target = found[3].get_attribute("data-id")
    found[3].click()  # search by a result: its neighbours, from its stored vector
    wait_for(browser, lambda d: "neighbours of" in d.find_element(By.ID, "status").text)
    assert browser.current_url.endswith(f"#id={target}")
    again = cards(browser)
    assert again[0].get_attribute("data-id") == target and len(again) == N
    assert browser.find_element(By.ID, "query-caption").text == images[int(target)].name
    wait_for(browser, all_thumbs_loaded)
    browser.save_screenshot(str(base / "neighbours.png"))

    browser.back()  # history works: back to the upload view
    wait_for(browser, lambda d: not d.current_url.endswith(f"#id={target}"))

    browser.find_element(By.ID, "tab-dups").click()
    threshold = wait_for(browser, lambda d: d.find_element(By.ID, "threshold"))
    threshold.clear()
    threshold.send_keys("-1")
    browser.find_element(By.CSS_SELECTOR, "#dups-form button").click()
    wait_for(browser, lambda d: "1 groups" in d.find_element(By.ID, "dups-status").text)
    assert len(cards(browser, "#groups")) == N
    wait_for(browser, all_thumbs_loaded)
    browser.save_screenshot(str(base / "duplicates.png"))

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_a_bad_upload_shows_the_servers_message(site, browser, tmp_path):
    from selenium.webdriver.common.by import By

    server, _, _ = site
    browser.get(server.url + "/")
    wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    status = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#status.error"))
    assert "not a usable image" in status.text and not cards(browser)
    assert server.get("/healthz").status == 200
