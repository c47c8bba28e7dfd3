"""Suite-wide guards: no network, no telemetry, per-run state dirs, fixed seeds."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest

# Real services (moto S3, mlflow server, prefect server) as fixtures for every test module.
# tests/ is a package (tests/__init__.py; torch-fidelity ships a top-level `tests` too, the checkout wins on sys.path).
pytest_plugins = ("tests.servers",)

# Set before any test module imports prefect/mlflow/dvc/huggingface.
for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

# Tensors produced by the official UltraFlux code (tests/fixtures/ultraflux_reference/README.md): in the repository,
# so a clone alone runs every parity test.
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ultraflux_reference"

_real_connect = socket.socket.connect


def _guarded_connect(self: socket.socket, address, *args, **kwargs):  # noqa: ANN001
    if self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            raise RuntimeError(f"test tried to reach {address!r}: tests must not use the network")
    return _real_connect(self, address, *args, **kwargs)


@pytest.fixture(autouse=True, scope="session")
def _no_network():
    socket.socket.connect = _guarded_connect
    yield
    socket.socket.connect = _real_connect


@pytest.fixture(scope="session")
def reference_fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny UltraFlux checkpoint in the official layout, built offline once per session."""
    from ultraflux_model.checkpoint.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-ultraflux")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
