"""Lineage of a run or release: which code, config and data produced it (one implementation for every package).

Weight-free and light (no MLflow, no torch): the training loop tags its runs with these, the registry tags the
model versions it registers, and the evaluation flow both.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import yaml

from ultraflux_core.files import file_sha256


def git_sha(repo: Path = Path(".")) -> str:
    """``HEAD`` of the repository at ``repo`` (``unknown`` outside a git checkout)."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def config_hash(text: str) -> str:
    """sha256 of a serialised config (the ``params.yaml`` text of the run)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dvc_data_hash(data_path: Path, index: str, lock_file: Path = Path("dvc.lock")) -> str:
    """The content hash of the data a run used, the one value training runs, evaluation runs and registered versions
    carry as ``dvc_data_hash``: the md5 that ``dvc.lock`` records for ``data_path`` (the ``dvc repro`` path), else
    ``sha256:<hex>`` of its committed index file ``data_path/index`` (the Prefect path, where no ``dvc.lock``
    entry exists; the index lists every entry, so it changes with the data), else ``none`` (no data at all)."""
    recorded = dvc_output_md5(data_path, lock_file)
    if recorded != "untracked":
        return recorded
    index_file = Path(data_path) / index
    return f"sha256:{file_sha256(index_file)}" if index_file.is_file() else "none"


def dvc_output_md5(data_path: Path, lock_file: Path = Path("dvc.lock")) -> str:
    """The md5 that ``dvc.lock`` records for the output at ``data_path`` ("untracked" when DVC does not track it).

    More specific than ``dvc_data_hash``: it changes only when that data itself does.
    """
    if not lock_file.is_file():
        return "untracked"
    lock = yaml.safe_load(lock_file.read_text()) or {}
    target = os.path.normpath(str(data_path))
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs", []) or []:
            if os.path.normpath(str(out.get("path", ""))) == target:
                return str(out.get("md5", "untracked"))
    return "untracked"
