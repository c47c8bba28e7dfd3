"""Dataset filters and subsets from the scores (official rules, thresholds in ``FilterConfig``).

1. Quality filters, each recorded as a boolean column: resolution (long side ≥ ``min_long_side`` and short
   side ≥ ``min_short_side``, any orientation), flatness (drop if ``flat_percentage > max_flat``), entropy
   (keep if ``≥ min_entropy``), Q-Align (keep if ``> min_qalign``; a missing score fails; ``None`` skips it).
2. Training set: the images passing every filter, top ``aesthetics_top`` share by aesthetics score.
3. SACL stage 2: the top ``stage2_top`` share by aesthetics of the training set (``stage2_pool:
   aesthetic_subset``, our reading: 5 % of the top 30 %) or of every image passing step 1 (``full_pool``).
4. VAE post-training: the least-flat ``vae_least_flat`` share of the training set (ascending flatness, higher
   entropy first among ties).
A share keeps ``ceil(share × n)`` rows (at least one when n > 0). Ties are broken by ``key`` so the selection
is a pure function of the scores.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from pydantic import BaseModel
from ultraflux_core.files import commit_folder, write_commit_marker

from ultraflux_data.config import FilterConfig

SUBSETS = ("train", "stage2", "vae")
OUTPUTS = ["selection.parquet", *(f"{name}.parquet" for name in SUBSETS), "summary.json"]


class FilterSummary(BaseModel):
    """Counts after each rule and per subset."""

    scored: int
    passed: dict[str, int]
    subsets: dict[str, int]


def _top(frame: pd.DataFrame, share: float, by: list[str], ascending: list[bool]) -> pd.DataFrame:
    if frame.empty:
        return frame
    count = max(1, math.ceil(share * len(frame) - 1e-9))
    return frame.sort_values([*by, "key"], ascending=[*ascending, True], kind="stable").head(count)


def check_one_scorer(scores: pd.DataFrame, column: str) -> str | None:
    """The scorer id behind ``column`` (its ``<name>_scorer`` column); a mix of scorers is an error."""
    from ultraflux_core.errors import UltraFluxError
    from ultraflux_eval.errors import EvalError
    from ultraflux_eval.metrics.aesthetic import single_scorer

    ids_column = column.removesuffix("_score") + "_scorer"
    if ids_column not in scores:
        return None  # scores written before scorer ids existed
    values = scores.loc[scores[column].notna(), ids_column]
    try:
        return single_scorer(column, values.tolist())
    except EvalError as err:
        raise UltraFluxError(str(err)) from err


def apply_filters(scores: pd.DataFrame, cfg: FilterConfig) -> pd.DataFrame:
    """``scores`` plus ``pass_*`` columns, ``passed``, ``drop_reason`` and ``in_<subset>`` membership columns.

    The Q-Align threshold and the aesthetics ranking each need one scorer per column (``check_one_scorer``).
    """
    out = scores.copy()
    if cfg.min_qalign is not None:
        check_one_scorer(out, "qalign_score")
    long_side = out[["width", "height"]].max(axis=1)
    short_side = out[["width", "height"]].min(axis=1)
    out["pass_resolution"] = (long_side >= cfg.min_long_side) & (short_side >= cfg.min_short_side)
    out["pass_flat"] = ~(out["flat_percentage"] > cfg.max_flat)
    out["pass_entropy"] = out["shannon_entropy"] >= cfg.min_entropy
    out["pass_qalign"] = True if cfg.min_qalign is None else out["qalign_score"].fillna(-math.inf) > cfg.min_qalign
    rules = ["pass_resolution", "pass_flat", "pass_entropy", "pass_qalign"]
    out["passed"] = out[rules].all(axis=1)
    out["drop_reason"] = [
        ",".join(rule.removeprefix("pass_") for rule in rules if not row[rule]) for _, row in out[rules].iterrows()
    ]
    pool = out[out["passed"]]
    check_one_scorer(pool, "aesthetics_score")
    ranked = pool.assign(aesthetics_score=pool["aesthetics_score"].fillna(-math.inf))
    train = _top(ranked, cfg.aesthetics_top, ["aesthetics_score"], [False])
    stage2 = _top(train if cfg.stage2_pool == "aesthetic_subset" else ranked, cfg.stage2_top,
                  ["aesthetics_score"], [False])
    vae = _top(train, cfg.vae_least_flat, ["flat_percentage", "shannon_entropy"], [True, False])
    for name, subset in zip(SUBSETS, (train, stage2, vae), strict=True):
        out[f"in_{name}"] = out["key"].isin(subset["key"])
    return out


def select_subsets(scores_path: Path | str, manifest: pd.DataFrame, out_dir: Path | str,
                   cfg: FilterConfig | None = None) -> FilterSummary:
    """Write ``selection.parquet`` (every scored image with its filter columns) and ``<subset>.parquet``
    (manifest rows + scores of each subset, best first) into ``out_dir``.

    The files are written into a sibling folder that replaces ``out_dir`` in one rename, with a commit marker
    (``_commit.json``: their sha256) written last: readers see the old set of files or the new one, never a mix,
    and a killed run leaves ``out_dir`` as it was. The caller holds the stage lock (``stages.run_filter``).
    """
    cfg = cfg or FilterConfig()
    scores = pd.read_parquet(scores_path)
    selection = apply_filters(scores, cfg)
    # Manifest columns the later stages need; the metadata score columns are superseded by ours.
    keep = [c for c in manifest.columns if c not in scores.columns or c == "key"]
    rows = selection.merge(manifest[keep], on="key", how="left")
    subsets = {}
    with commit_folder(out_dir) as out:
        selection.to_parquet(out / "selection.parquet", index=False)
        for name in SUBSETS:
            subset = rows[rows[f"in_{name}"]]
            if name == "vae":
                subset = subset.sort_values(["flat_percentage", "shannon_entropy", "key"],
                                            ascending=[True, False, True])
            else:
                subset = subset.sort_values(["aesthetics_score", "key"], ascending=[False, True])
            subset.to_parquet(out / f"{name}.parquet", index=False)
            subsets[name] = len(subset)
        passed = {rule.removeprefix("pass_"): int(selection[rule].sum())
                  for rule in ("pass_resolution", "pass_flat", "pass_entropy", "pass_qalign", "passed")}
        summary = FilterSummary(scored=len(selection), passed=passed, subsets=subsets)
        (out / "summary.json").write_text(summary.model_dump_json(indent=2) + "\n")
        write_commit_marker(out, OUTPUTS)
    return summary
