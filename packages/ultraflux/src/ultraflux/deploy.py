"""What a deployed flow run needs beyond the config: the shared roots its outputs live under, and the code of the
commit it was deployed from.

A worker runs every flow run in a throwaway folder (the process pool's git clone, deleted afterwards; a fresh pod on
Kubernetes), while the config's paths are relative (``artifacts/data``, ``artifacts/train``,
``artifacts/tiny-ultraflux``). :class:`SharedRoots` maps that ``artifacts/`` layout onto absolute folders that
outlive the run (``prefect.yaml`` gives each pool its defaults); :func:`use_checkout` is the pull step that makes the
flow import the library of the cloned commit rather than whatever the worker has installed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from ultraflux_core.config import Section
from ultraflux_core.errors import UltraFluxError

# The repository's output layout (params.yaml, dvc.yaml): the prefix every local output path starts with.
LOCAL_PREFIX = "artifacts/"
MODEL_CACHE_ENV = "ULTRAFLUX_MODEL_CACHE"  # read by ultraflux_model.release.fetch.model_cache_root
BASE_CHECKPOINTS = ("tiny-ultraflux",)  # checkpoint folders the repository writes under artifacts/ (make demo)
OUR_PACKAGES = ("ultraflux", "ultraflux_core", "ultraflux_model", "ultraflux_eval", "ultraflux_data")


class SharedRoots(Section):
    """Absolute folders a deployment's outputs live in; ``None`` keeps the config's relative path."""

    data: Path | None = Field(None, description="artifacts/data/… (data.root, train.cache_dir, vae_train.images)")
    runs: Path | None = Field(
        None, description="every other artifacts/… output (training, VAE post-training, evaluation) and the default "
        "MLflow store <runs>/mlflow.db when neither tracking.uri nor $MLFLOW_TRACKING_URI is set")
    releases: Path | None = Field(None, description="artifacts/release/… (assembled releases)")
    models: Path | None = Field(
        None, description="base checkpoints (artifacts/tiny-ultraflux → <models>/tiny-ultraflux) and the release "
        "cache ($ULTRAFLUX_MODEL_CACHE = <models>/cache)")

    @field_validator("data", "runs", "releases", "models")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError(f"{value} is relative: a shared root must be absolute (the run's folder is deleted)")
        return value

    def rebase(self, path: str) -> str:
        """``artifacts/<part>/…`` onto its root (data → data, release → releases, a base checkpoint folder →
        models, anything else → runs); other paths (absolute, hub ids, ``storage/…``) unchanged."""
        if not isinstance(path, str) or not path.startswith(LOCAL_PREFIX):
            return path
        rest = path[len(LOCAL_PREFIX) :]
        head = rest.split("/", 1)[0]
        if head == "data":
            root, rest = self.data, rest[len("data") :].lstrip("/")
        elif head == "release":
            root, rest = self.releases, rest[len("release") :].lstrip("/")
        elif head in BASE_CHECKPOINTS:
            root = self.models
        else:
            root = self.runs
        return path if root is None else str(root / rest) if rest else str(root)

    def overrides(self, config: Mapping[str, Any], tracking_uri: str | None) -> list[str]:
        """``section.key=value`` overrides moving every ``artifacts/…`` string of ``config`` (a dumped config tree;
        lists are left alone) onto the roots, plus the runs root's MLflow store when no tracking URI is set."""
        out = [f"{key}={self.rebase(value)}" for key, value in _strings(config) if self.rebase(value) != value]
        if self.runs is not None and tracking_uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
            out.append(f"tracking.uri=sqlite:///{self.runs / 'mlflow.db'}")
        return out

    def apply_model_cache(self) -> None:
        """Point the release cache at ``<models>/cache`` for this process (the flow run's own process)."""
        if self.models is not None:
            os.environ[MODEL_CACHE_ENV] = str(self.models / "cache")


def _strings(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            found += _strings(value, f"{prefix}{key}.")
        elif isinstance(value, str):
            found.append((f"{prefix}{key}", value))
    return found


def with_roots(config: Sequence[str] | None, overrides: Sequence[str] | None,
               roots: SharedRoots | None) -> list[str]:
    """``overrides`` plus those that move the layered config's outputs onto ``roots`` (user overrides stay last, so
    an explicit ``data.root=…`` still wins); also points the model cache at the roots."""
    from ultraflux.config import resolve_config

    overrides = list(overrides or [])
    if roots is None:
        return overrides
    roots.apply_model_cache()
    cfg = resolve_config(config, overrides)
    return roots.overrides(cfg.model_dump(mode="json"), cfg.tracking.uri) + overrides


def use_checkout(directory: str) -> dict[str, str]:
    """Prefect pull step: import UltraFlux from ``<directory>/packages/*/src`` (the cloned commit), not the worker's
    installed copy. Puts those folders first on ``sys.path`` and ``$PYTHONPATH`` (training ranks are subprocesses)
    and forgets modules of ours imported so far (this one included), so the flow's imports load the clone's."""
    sources = sorted(str(p.resolve()) for p in Path(directory).glob("packages/*/src") if p.is_dir())
    if not sources:
        raise UltraFluxError(f"{directory} has no packages/*/src: clone the UltraFlux repository, not a subfolder")
    sys.path[:] = [*sources, *(p for p in sys.path if p not in sources)]
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([*sources, *([previous] if previous else [])])
    for name in [n for n in sys.modules if n.split(".")[0] in OUR_PACKAGES]:
        del sys.modules[name]
    return {"directory": directory}
