"""Fixtures shared by the training tests of this folder."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def training_cache(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real data pipeline on the synthetic set (ingest → score → filter → bucket → shard → cache), once."""
    from ultraflux_data import stages as data_stages
    from ultraflux_data.config import DataConfig

    root = tmp_path_factory.mktemp("training-data")
    cfg = DataConfig.model_validate({"root": str(root), "synthetic": {"n": 16},
                                     "cache": {"model": str(tiny_checkpoint), "max_sequence_length": 8}})
    data_stages.run_ingest(cfg, progress=False)
    data_stages.run_score(cfg, progress=False)
    data_stages.run_filter(cfg)
    data_stages.run_bucket(cfg)
    data_stages.run_shard(cfg, progress=False)
    data_stages.run_cache(cfg, progress=False)
    return root / "cache"
