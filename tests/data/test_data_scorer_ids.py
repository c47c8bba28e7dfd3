"""Score columns carry their scorer's id; the Q-Align threshold and the aesthetics ranking refuse a mix."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from ultraflux_core.errors import UltraFluxError
from ultraflux_data.config import FilterConfig, ScoringConfig
from ultraflux_data.filters import apply_filters
from ultraflux_data.scoring import score_images


def _frame(aesthetics_ids, qalign_ids=None) -> pd.DataFrame:
    n = len(aesthetics_ids)
    return pd.DataFrame({
        "key": [f"k{i}" for i in range(n)], "width": [4096] * n, "height": [2304] * n,
        "flat_percentage": [0.1] * n, "shannon_entropy": [7.5] * n,
        "qalign_score": [4.5] * n, "aesthetics_score": [float(i) for i in range(n)],
        "aesthetics_scorer": aesthetics_ids, "qalign_scorer": qalign_ids or ["qalign:tiny"] * n,
    })


def test_each_learned_column_names_its_scorer():
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(3)]
    known = [{"qalign_score": 4.5, "aesthetics_score": 7.0}, {"qalign_score": 2.0}, {}]
    rows = score_images(images, ScoringConfig(flat_patch=16), known)
    assert [r["aesthetics_scorer"] for r in rows] == ["metadata", "artimuse:tiny", "artimuse:tiny"]
    assert [r["qalign_scorer"] for r in rows] == ["metadata", "metadata", "qalign:tiny"]
    assert 0.0 <= rows[1]["aesthetics_score"] <= 100.0 and 1.0 <= rows[2]["qalign_score"] <= 5.0
    laion = score_images(images[:1], ScoringConfig(flat_patch=16, aesthetics_scorer="laion"), [{}])
    assert laion[0]["aesthetics_scorer"] == "laion:tiny"
    none = score_images(images[:1], ScoringConfig(flat_patch=16, qalign="none", aesthetics="none"), [{}])
    assert none[0]["aesthetics_scorer"] is None and np.isnan(none[0]["aesthetics_score"])


def test_one_scorer_ranks_and_a_mix_is_refused():
    cfg = FilterConfig(min_long_side=3840, min_short_side=2160, min_qalign=4.0, aesthetics_top=0.5)
    out = apply_filters(_frame(["artimuse:tiny"] * 4), cfg)
    assert sorted(out.loc[out["in_train"], "key"]) == ["k2", "k3"]
    with pytest.raises(UltraFluxError, match=r"aesthetics_score mixes scores of different scorers "
                                             r"\['artimuse:tiny', 'metadata'\]"):
        apply_filters(_frame(["metadata", "metadata", "artimuse:tiny", "metadata"]), cfg)
    with pytest.raises(UltraFluxError, match="qalign_score mixes"):
        apply_filters(_frame(["metadata"] * 4, ["metadata", "qalign:tiny", "metadata", "metadata"]), cfg)
    # without the Q-Align rule its scorers do not matter; rows whose score is missing do not count as a scorer
    relaxed = FilterConfig(min_long_side=3840, min_short_side=2160, min_qalign=None, aesthetics_top=0.5)
    frame = _frame(["metadata"] * 3 + [None], ["metadata", "qalign:tiny", "metadata", "metadata"])
    frame.loc[3, "aesthetics_score"] = np.nan
    assert apply_filters(frame, relaxed)["in_train"].sum() == 2
