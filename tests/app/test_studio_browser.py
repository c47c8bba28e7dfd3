"""A real browser against the running app: Debian's headless Chromium driven by Selenium and the system driver."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ultraflux_model.app.engine import list_outputs

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        # System packages are the test set-up's (`make test` runs `make test-deps`), never the demo's: without them
        # this one test is skipped, saying how to get them.
        pytest.skip("headless-browser test skipped: chromium and chromedriver are missing; `make test-deps` installs "
                    "them as root (apt: chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
                f"--user-data-dir={tmp_path / 'profile'}", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    # An explicit driver path makes Selenium skip Selenium Manager: nothing is downloaded at run time.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()  # stops chromium and chromedriver (the processes this fixture started)


def _set_number(driver, elem_id: str, value: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value), Keys.TAB)


def test_page_generates_an_image_and_lists_it(browser, studio_app, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(studio_app.url)
    wait = WebDriverWait(browser, 120)
    prompt = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
    prompt.send_keys("a lighthouse on a cliff at dusk")
    _set_number(browser, "width", 384)
    _set_number(browser, "height", 256)
    wait.until(ec.text_to_be_present_in_element((By.ID, "size-note"), "384×256"))
    browser.find_element(By.CSS_SELECTOR, "#generate").click()

    def result_loaded(driver):
        images = driver.find_elements(By.CSS_SELECTOR, "#result img")
        loaded = [img for img in images if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)]
        return loaded[0] if loaded else False

    image = wait.until(result_loaded)
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == [384, 256]
    shot = tmp_path / "studio.png"
    browser.save_screenshot(str(shot))
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[0] > 500 and pixels.shape[1] > 1000
    assert pixels.std() > 20  # a page with content, not a blank or single-colour screen
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000  # the generated noise-like image is on it
    # The gallery: the new image is listed; selecting it offers its PNG and JSON sidecar for download.
    next(tab for tab in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if tab.text.strip() == "Gallery").click()
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#gallery img"))).click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "downloads"), ".json"))
    assert ".png" in browser.find_element(By.ID, "downloads").text
    made = [path for path, side in list_outputs(studio_app.out) if side.get("prompt") == "a lighthouse on a cliff at dusk"]
    assert len(made) == 1 and Image.open(made[0]).size == (384, 256)
