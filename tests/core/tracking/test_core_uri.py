"""Tracking-URI resolution (the root section's run-directory store and the eval section's working-directory
store go through one function), the fail-fast reachability check and what its message advises, and the kinds of
model URI."""

from __future__ import annotations

from pathlib import Path

import pytest
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.tracking.config import TrackingConfig
from ultraflux_core.tracking.uri import (
    check_tracking_reachable,
    is_registered_model_uri,
    is_registry_uri,
    logged_model_id,
    resolve_tracking_uri,
)
from ultraflux_eval.config import TrackingConfig as EvalTrackingConfig

from tests.servers import free_port


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert TrackingConfig().resolve_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    # the demo's store under the working directory: the one default of every lookup
    assert EvalTrackingConfig().resolve_uri() == f"sqlite:///{Path('artifacts/mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert TrackingConfig().resolve_uri(tmp_path) == "http://127.0.0.1:5000"
    assert EvalTrackingConfig().resolve_uri() == "http://127.0.0.1:5000"
    assert TrackingConfig(uri="sqlite:///x.db").resolve_uri(tmp_path) == "sqlite:///x.db"
    assert EvalTrackingConfig(tracking_uri="sqlite:///y.db").resolve_uri() == "sqlite:///y.db"
    assert resolve_tracking_uri(None, "store.db") == "http://127.0.0.1:5000"


def test_unreachable_server_message_says_what_to_change() -> None:
    with pytest.raises(UltraFluxError, match="MLFLOW_TRACKING_URI"):
        check_tracking_reachable(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    with pytest.raises(UltraFluxError, match="is unreachable .*; start it, or set eval.tracking.tracking_uri"):
        check_tracking_reachable(f"http://127.0.0.1:{free_port()}", timeout_s=2,
                                 advice="set eval.tracking.tracking_uri")


def test_model_uri_kinds() -> None:
    assert is_registry_uri("models:/ultraflux@champion") and is_registry_uri("runs:/abc/model")
    assert not is_registry_uri("artifacts/tiny-ultraflux") and not is_registry_uri("Owen777/UltraFlux-v1")
    assert is_registered_model_uri("models:/ultraflux@champion") and is_registered_model_uri("models:/ultraflux/3")
    assert not is_registered_model_uri("models:/m-0123abcd") and not is_registered_model_uri("runs:/abc/model")
    assert logged_model_id("models:/m-0123abcd") == "m-0123abcd" and logged_model_id("models:/ultraflux/3") is None
