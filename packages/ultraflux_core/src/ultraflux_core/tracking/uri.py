# INTERIM (replaced by the eval-layout branch): registry URI predicates.
from __future__ import annotations

import os

REGISTRY_SCHEMES = ("models:/", "runs:/")


def is_registry_uri(model: str | os.PathLike) -> bool:
    """``models:/…`` or ``runs:/…``: a model that lives in an MLflow tracking server / registry."""
    return str(model).startswith(REGISTRY_SCHEMES)


def model_download_uri(uri: str, model_uri: str) -> str:
    from ultraflux_eval.registry import model_download_uri as impl

    return impl(uri, model_uri)
