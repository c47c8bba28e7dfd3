"""Scoring: values come from ultraflux_eval's one implementation, partitioned by key range, resumes, quarantines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from ultraflux_data.config import ComputeConfig, FilterConfig, ScoringConfig
from ultraflux_data.filters import apply_filters, select_subsets
from ultraflux_data.ingest import ingest, read_manifest
from ultraflux_data.scoring import score_images, score_manifest, scoring_hash
from ultraflux_eval.metrics.scores import flat_percentage, load_rgb, shannon_entropy


def constant_scorers(cfg: ScoringConfig) -> dict:
    """Module-level injected scorers: cheap and exactly predictable."""
    return {
        "qalign_score": lambda images: np.array([1.0 + 4.0 * (im.mean() / 255.0) for im in images]),
        "aesthetics_score": lambda images: np.array([float(im.shape[1]) for im in images]),
    }


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    for i in range(7):
        w, h = 64 + 16 * i, 96 - 8 * i
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if i % 3 else np.full((h, w, 3), 40 * i, np.uint8)
        Image.fromarray(pixels).save(src / f"im{i}.png")
    out = tmp_path_factory.mktemp("ingest")
    ingest(src, out, progress=False)
    return out


def test_scores_match_the_eval_package(ingested, tmp_path):
    cfg = ScoringConfig(flat_patch=32, qalign="none", aesthetics="none")
    summary = score_manifest(ingested, tmp_path / "scores.parquet", cfg, progress=False)
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    manifest = read_manifest(ingested)
    assert summary.images == len(manifest) == len(scores) and list(scores["key"]) == list(manifest["key"])
    for _, row in scores.merge(manifest[["key", "path"]], on="key").iterrows():
        rgb = load_rgb(ingested / row["path"])
        assert row["flat_percentage"] == flat_percentage(rgb, patch=32, threshold=800.0)
        assert row["shannon_entropy"] == shannon_entropy(rgb)
        assert (row["width"], row["height"]) == (rgb.shape[1], rgb.shape[0])
        assert np.isnan(row["qalign_score"]) and np.isnan(row["aesthetics_score"])
    assert set(scores["flat_percentage"]) >= {0.0, 1.0}  # noise is never flat, constants always are


def test_partitioning_does_not_change_scores_and_rerun_scores_nothing(ingested, tmp_path):
    cfg = ScoringConfig(flat_patch=32)
    score_manifest(ingested, tmp_path / "a.parquet", cfg, progress=False, scorer_factory=constant_scorers,
                   compute=ComputeConfig(partition_size=100))
    summary = score_manifest(ingested, tmp_path / "b.parquet", cfg, progress=False, scorer_factory=constant_scorers,
                             compute=ComputeConfig(partition_size=2))
    a, b = pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "b.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert len(list((tmp_path / "b.parquet.parts").rglob("p*.parquet"))) > 1  # several key ranges were written
    assert summary.scored_now == len(a) and (a["aesthetics_score"] == a["width"]).all()
    assert (a["learned_from"] == "qalign_score:model,aesthetics_score:model").all()
    # everything scored: a rerun scores nothing and leaves the file as it was
    again = score_manifest(ingested, tmp_path / "b.parquet", cfg, progress=False, scorer_factory=constant_scorers,
                           compute=ComputeConfig(partition_size=2))
    assert again.scored_now == 0 and again.reused == len(a)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "b.parquet"), a)


def test_killed_run_resumes_with_the_missing_partitions_only(ingested, tmp_path):
    cfg, compute = ScoringConfig(flat_patch=32), ComputeConfig(partition_size=2)
    out = tmp_path / "s.parquet"
    score_manifest(ingested, out, cfg, progress=False, scorer_factory=constant_scorers, compute=compute)
    full = pd.read_parquet(out)
    parts = sorted((out.with_name(out.name + ".parts") / scoring_hash(cfg, constant_scorers)).glob("p*.parquet"))
    # As if killed after the first partitions: the last one and the final parquet are missing.
    parts[-1].unlink()
    out.unlink()
    summary = score_manifest(ingested, out, cfg, progress=False, scorer_factory=constant_scorers, compute=compute)
    assert 0 < summary.scored_now < len(full) and summary.reused == len(full) - summary.scored_now
    pd.testing.assert_frame_equal(pd.read_parquet(out), full)
    # the final parquet alone (e.g. after `dvc checkout`, no parts) is reused for the same settings
    for part in out.with_name(out.name + ".parts").rglob("p*.parquet"):
        part.unlink()
    assert score_manifest(ingested, out, cfg, progress=False, scorer_factory=constant_scorers,
                          compute=compute).scored_now == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out), full)
    # other settings → other hash → nothing reused
    changed = score_manifest(ingested, out, cfg.model_copy(update={"flat_patch": 16}), progress=False,
                             scorer_factory=constant_scorers, compute=compute)
    assert changed.scored_now == len(full)


def test_corrupt_image_is_quarantined_not_failing_its_partition(ingested, tmp_path):
    import shutil

    copy = tmp_path / "ingest"
    shutil.copytree(ingested, copy)
    manifest = read_manifest(copy)
    victim = copy / manifest["path"].iloc[0]
    victim.unlink()  # break the hard link (if any) before damaging the file
    victim.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "s.parquet"
    summary = score_manifest(copy, out, ScoringConfig(flat_patch=32), progress=False, scorer_factory=constant_scorers,
                             compute=ComputeConfig(partition_size=100))  # one partition holds every image
    scores = pd.read_parquet(out)
    quarantine = pd.read_parquet(tmp_path / "s.quarantine.parquet")
    assert summary.quarantined == 1 and summary.images == len(manifest) - 1 == len(scores)
    assert list(quarantine["key"]) == [manifest["key"].iloc[0]] and quarantine["reason"].iloc[0].startswith("corrupt")
    assert manifest["key"].iloc[0] not in set(scores["key"])


def test_metadata_scores_are_reused_and_tiny_scorers_run(tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(3)]
    known = [{"qalign_score": 4.5, "aesthetics_score": 7.0}, {"qalign_score": 2.0}, {}]
    rows = score_images(images, ScoringConfig(flat_patch=16), known)
    assert rows[0]["qalign_score"] == 4.5 and rows[0]["aesthetics_score"] == 7.0
    assert rows[1]["qalign_score"] == 2.0 and np.isfinite(rows[1]["aesthetics_score"])
    assert 1.0 <= rows[2]["qalign_score"] <= 5.0 and np.isfinite(rows[2]["aesthetics_score"])
    assert rows[1]["learned_from"] == "qalign_score:metadata,aesthetics_score:model"


def _scores_frame() -> pd.DataFrame:
    n = 20
    return pd.DataFrame({
        "key": [f"k{i:02d}" for i in range(n)],
        "width": [4096] * 18 + [1920, 3840], "height": [2304] * 18 + [1080, 2160],
        "flat_percentage": [i / 40 for i in range(n)][:-2] + [0.0, 0.6],
        "shannon_entropy": [7.5] * 17 + [6.9, 7.5, 7.5],
        "qalign_score": [4.5] * 16 + [4.0, 4.5, 4.5, 4.5],
        "aesthetics_score": [float(i) for i in range(n)],
    })


def test_official_filters_and_subsets():
    cfg = FilterConfig(min_long_side=3840, min_short_side=2160, max_flat=0.5, min_entropy=7.0, min_qalign=4.0,
                       aesthetics_top=0.3, stage2_top=0.05, vae_least_flat=0.5)
    out = apply_filters(_scores_frame(), cfg).set_index("key")
    assert not out.loc["k18", "pass_resolution"] and out.loc["k19", "pass_resolution"]  # 3840x2160 is enough
    assert not out.loc["k19", "pass_flat"] and out.loc["k18", "pass_flat"]  # 0.6 > 0.5 dropped
    assert not out.loc["k16", "pass_qalign"]  # Q-Align must be > 4.0
    assert not out.loc["k17", "pass_entropy"]  # 6.9 < 7.0
    assert out.loc["k19", "drop_reason"] == "flat" and out.loc["k18", "drop_reason"] == "resolution"
    passed = out[out["passed"]]
    assert list(passed.index) == [f"k{i:02d}" for i in range(16)]
    train = out[out["in_train"]].sort_values("aesthetics_score", ascending=False)
    assert list(train.index) == ["k15", "k14", "k13", "k12", "k11"]  # ceil(0.3 * 16) = 5, best aesthetics
    assert list(out[out["in_stage2"]].index) == ["k15"]  # ceil(0.05 * 5) = 1
    assert sorted(out[out["in_vae"]].index) == ["k11", "k12", "k13"]  # least flat 3 of 5
    assert out["in_stage2"].le(out["in_train"]).all() and out["in_vae"].le(out["in_train"]).all()


def test_stage2_pool_and_an_already_filtered_release():
    """Our reading takes stage 2 from the training set (5 % of the top 30 %); full_pool from every passing image;
    aesthetics_top 1.0 (a release already filtered by aesthetics) keeps every passing image for training."""
    official = dict(min_long_side=3840, min_short_side=2160, min_qalign=4.0, aesthetics_top=0.3)
    subset = apply_filters(_scores_frame(), FilterConfig(**official, stage2_top=0.2)).set_index("key")
    assert list(subset[subset["in_stage2"]].index) == ["k15"]  # ceil(0.2 * 5) = 1 of the training set
    full = apply_filters(_scores_frame(), FilterConfig(**official, stage2_top=0.2, stage2_pool="full_pool"))
    full = full.set_index("key")
    assert sorted(full[full["in_stage2"]].index) == ["k12", "k13", "k14", "k15"]  # ceil(0.2 * 16) = 4 of the pool
    assert full["in_stage2"].le(full["in_train"]).all()
    assert full["in_train"].equals(subset["in_train"]) and full["in_vae"].equals(subset["in_vae"])
    kept = apply_filters(_scores_frame(), FilterConfig(**{**official, "aesthetics_top": 1.0})).set_index("key")
    assert kept["in_train"].equals(kept["passed"]) and kept["in_train"].sum() == 16
    with pytest.raises(ValueError, match="stage2_top"):
        FilterConfig(aesthetics_top=0.3, stage2_top=0.5, stage2_pool="full_pool")


def test_select_subsets_writes_parquets(tmp_path):
    scores = _scores_frame()
    scores.to_parquet(tmp_path / "scores.parquet")
    manifest = scores[["key", "width", "height"]].assign(path=[f"images/{k}.png" for k in scores["key"]],
                                                          caption_en="c", status="ok")
    summary = select_subsets(tmp_path / "scores.parquet", manifest, tmp_path / "subsets",
                             FilterConfig(min_long_side=3840, min_short_side=2160, min_qalign=4.0, aesthetics_top=0.3,
                                          stage2_top=0.05))
    assert summary.subsets == {"train": 5, "stage2": 1, "vae": 3} and summary.passed["passed"] == 16
    train = pd.read_parquet(tmp_path / "subsets" / "train.parquet")
    assert list(train["key"]) == ["k15", "k14", "k13", "k12", "k11"] and "path" in train and "caption_en" in train
