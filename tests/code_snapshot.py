"""A git repository holding the working tree's flow code, for deployments whose pull step is ``git_clone``.

Tests commit what a process worker needs from the checkout (flows, the packages the flows import from the clone,
params.yaml, presets) into a fresh repository under ``tmp_path`` and point ``ULTRAFLUX_GIT_REPOSITORY``
(prefect.yaml) at it, so the worker clones exactly the code under test (uncommitted edits included) and nothing
leaves the machine. ``prefect deploy`` runs inside the snapshot: it pins the snapshot's commit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODE = ("flows", "packages", "configs", "params.yaml", "prefect.yaml")
BRANCH = "main"


def git_snapshot(dst: Path) -> dict[str, str]:
    """Commit ``CODE`` from the working tree into a new repository at ``dst``; returns the env prefect.yaml reads."""
    dst.mkdir(parents=True)
    for name in CODE:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, dst / name)
    env = {**os.environ, "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost"}
    for args in (["init", "-q", "-b", BRANCH], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
        subprocess.run(["git", *args], cwd=dst, env=env, check=True, capture_output=True, timeout=60)
    return {"ULTRAFLUX_GIT_REPOSITORY": str(dst), "ULTRAFLUX_GIT_BRANCH": BRANCH}


def git_commit(repo: Path, message: str) -> str:
    """Commit everything in ``repo``'s work tree; returns the new commit."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost"}
    for args in (["add", "-A"], ["commit", "-q", "-m", message]):
        subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, timeout=60)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True, text=True,
                          timeout=60).stdout.strip()
