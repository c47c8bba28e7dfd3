"""Take the README's Studio screenshot (``docs/images/studio.png``) with the browser test's machinery:

    python -m tests.app.studio_screenshot docs/images/studio.png

Two tiny checkpoints under relative names in a temporary folder (so the page shows no machine path), ``ultraflux ui``
on a free loopback port, one comparison, the A/B slider captured; the server is stopped by its PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.app.browser import chromium, loaded_image, open_tab
from tests.app.conftest import _wait_until_up, free_port

PROMPT = "a lighthouse on a cliff at dusk, waves below"


def take(shot: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    from ultraflux_model.checkpoint.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tiny_checkpoint(root / "tiny-ultraflux")
        write_tiny_checkpoint(root / "tiny-ultraflux-b", seed=1)
        port, log = free_port(), root / "server.log"
        cmd = [str(Path(sys.executable).with_name("ultraflux")), "ui", "--model", "tiny-ultraflux", "--compare",
               "tiny-ultraflux-b", "--out", "studio", "--steps", "4", "--port", str(port)]  # fmt: skip
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
        with log.open("w") as sink:
            proc = subprocess.Popen(cmd, cwd=root, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)  # fmt: skip
        url = f"http://127.0.0.1:{port}/"
        try:
            _wait_until_up(proc, url, log)
            with chromium(root / "profile", size=(1400, 1050)) as browser:
                browser.get(url)
                wait = WebDriverWait(browser, 300)
                wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea"))).send_keys(PROMPT)
                open_tab(browser, "Compare")
                browser.find_element(By.CSS_SELECTOR, "#compare").click()
                wait.until(loaded_image("#compare-slider img", 2))
                wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "done"))
                browser.save_screenshot(str(shot))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images/studio.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    take(target)
    print(f"wrote {target}")
