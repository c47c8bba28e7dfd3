"""Debian's headless Chromium driven by Selenium through the system driver: shared by the browser test and the
script that takes the README's Studio screenshot (``python -m tests.app.studio_screenshot``)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def have_chromium() -> bool:
    return Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()


@contextmanager
def chromium(profile: Path, size: tuple[int, int] = (1400, 1000)) -> Iterator:
    """A headless Chromium (Selenium ``webdriver.Chrome``) with its own profile folder; always quit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={size[0]},{size[1]}", f"--user-data-dir={profile}", "--no-first-run",
                "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    # An explicit driver path makes Selenium skip Selenium Manager: nothing is downloaded at run time.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()  # stops chromium and chromedriver (the processes this started)


def set_number(driver, elem_id: str, value: int) -> None:
    """Type ``value`` into the number field ``#elem_id`` (select all, type, leave the field)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value), Keys.TAB)


def open_tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    next(tab for tab in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if tab.text.strip() == name).click()


def loaded_image(css: str, count: int = 1):
    """A Selenium wait condition: the first ``count`` images under ``css`` once all of them have loaded."""
    from selenium.webdriver.common.by import By

    def condition(driver):
        images = driver.find_elements(By.CSS_SELECTOR, css)
        script = "return arguments[0].complete && arguments[0].naturalWidth"
        done = [i for i in images if driver.execute_script(script, i)]
        return done[:count] if len(done) >= count else False

    return condition
