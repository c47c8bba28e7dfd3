"""Set-up (issue 20, item 1): `make demo` installs Python packages only; the browser test's system packages belong
to the test set-up, which `make test` (and so CI's `.ci/run`) runs first."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(target: str, venv: Path) -> str:
    """The commands ``make TARGET`` would run on a fresh clone (``-n``: nothing is executed)."""
    return subprocess.run(["make", "-n", "-C", str(ROOT), target, f"VENV={venv}"], capture_output=True, text=True,
                          check=True, timeout=60).stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_demo_installs_no_system_package_and_test_does(tmp_path):
    demo = _dry_run("demo", tmp_path / "venv")
    assert "pip install" in demo and "flows.pipeline" in demo  # the Python set-up, then the demo
    assert "apt-get" not in demo and "chromium" not in demo
    test = _dry_run("test", tmp_path / "venv")
    assert "apt-get" in test and "chromium-driver" in test and "pytest" in test
    assert "make test" in (ROOT / ".ci" / "run").read_text()  # CI still gets the browser
