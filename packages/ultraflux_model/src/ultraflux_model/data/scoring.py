"""Score every ingested image, in parallel processes, into one resumable parquet.

Weight-free scores come from ``ultraflux_eval.scores`` (the one implementation shared with evaluation):
resolution, aspect ratio, flat percentage, Shannon entropy. Learned scores (Q-Align, aesthetics) come from
``ultraflux_eval.aesthetic`` scorers with the backbones the config selects (tiny random ones in CI, local
weights in production); when the metadata already carries them (``reuse_metadata_scores``) they are taken
from there instead.

Work is cut into chunks of ``chunk_size`` images; each finished chunk is written at once as a part file under
``<out>.parts/<scoring-hash>/``, so a killed run resumes with the chunks it had not finished, and a change of
scoring settings (new hash) never reuses stale scores. Workers are spawned processes (``workers > 1``), each
loading its learned scorers once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel
from tqdm import tqdm
from ultraflux_eval.scores import flat_percentage, load_rgb, shannon_entropy

from ultraflux_model.config import ScoringConfig
from ultraflux_model.data.ingest import read_manifest
from ultraflux_model.errors import UltraFluxError

SCORE_COLUMNS = ("key", "width", "height", "aspect", "flat_percentage", "shannon_entropy", "qalign_score",
                 "aesthetics_score", "learned_from", "scoring_hash", "qalign_scorer", "aesthetics_scorer")
LEARNED = ("qalign_score", "aesthetics_score")
# each learned score column carries the id of the scorer that produced it (filters refuse to rank a mix)
SCORER_COLUMN = {"qalign_score": "qalign_scorer", "aesthetics_score": "aesthetics_scorer"}

ScoreFn = Callable[[Sequence[np.ndarray]], np.ndarray]


class ScoreSummary(BaseModel):
    """Counts and means of one scoring run."""

    images: int
    scored_now: int
    reused: int
    means: dict[str, float]


def scoring_hash(cfg: ScoringConfig, factory: Callable | None = None) -> str:
    """Short hash of what changes score values: the settings (not workers/chunking) and the scorer factory."""
    relevant = cfg.model_dump(mode="json", exclude={"workers", "chunk_size", "batch_size", "device"})
    factory = factory or default_scorers
    relevant["factory"] = f"{factory.__module__}.{factory.__qualname__}"
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def default_scorers(cfg: ScoringConfig) -> dict[str, ScoreFn]:
    """The learned scorers ``cfg`` asks for, keyed by score column (built with ``ultraflux_eval`` backbones).

    ``aesthetics``: ``ClipAestheticScorer`` on tiny random CLIP + head, or on ``weights_dir`` (sha256-verified,
    roles ``clip`` and ``aesthetic_head``). ``qalign``: the tiny stand-in through ``TorchImageScorer``.
    """
    scorers: dict[str, ScoreFn] = {}
    if cfg.aesthetics in ("tiny", "local"):
        # imported here: weight-free-only workers then never pay for importing torch
        from ultraflux_eval.aesthetic import ClipAestheticScorer
        from ultraflux_eval.backbones import local_backbones, tiny_backbones

        if cfg.aesthetics == "tiny":
            nets = tiny_backbones(["aesthetic"])
        else:
            nets = local_backbones(cfg.weights_dir, ["aesthetic"])
        aesthetic = ClipAestheticScorer(nets.require("clip"), nets.require("aesthetic_head"), cfg.batch_size,
                                        cfg.device)
        scorers["aesthetics_score"] = aesthetic.score
    if cfg.qalign == "tiny":
        from ultraflux_eval.aesthetic import TorchImageScorer

        from ultraflux_model.data.qalign import TinyQAlign

        scorers["qalign_score"] = TorchImageScorer("qalign", TinyQAlign(), size=64, batch_size=cfg.batch_size,
                                                   device=cfg.device).score
    return scorers


ScorerFactory = Callable[[ScoringConfig], dict[str, ScoreFn]]


def model_scorer_id(cfg: ScoringConfig, factory: Callable, column: str) -> str:
    """Id of the scorer a factory uses for ``column``: backbone and weights source, so scores from different
    networks (tiny vs local weights, LAION vs another head) never look alike."""
    if factory is default_scorers:
        if column == "aesthetics_score":
            return f"laion-aesthetic:{cfg.aesthetics}" + (f":{cfg.weights_dir}" if cfg.aesthetics == "local" else "")
        return f"qalign:{cfg.qalign}"
    return f"{factory.__module__}.{factory.__qualname__}:{column}"


@functools.lru_cache(maxsize=4)
def _scorers(factory: ScorerFactory, cfg: ScoringConfig) -> dict[str, ScoreFn]:
    """Built once per process (each spawned worker builds its own)."""
    return factory(cfg)


def score_images(images: Sequence[np.ndarray], cfg: ScoringConfig,
                 known: Sequence[dict[str, float]] | None = None,
                 scorer_factory: ScorerFactory = default_scorers) -> list[dict]:
    """Scores of RGB uint8 arrays ``[H, W, 3]``; ``known[i]`` holds metadata scores to reuse for image ``i``."""
    known = known or [{} for _ in images]
    rows = []
    for rgb, given in zip(images, known, strict=True):
        height, width = rgb.shape[:2]
        rows.append({
            "width": width, "height": height, "aspect": width / height,
            "flat_percentage": flat_percentage(rgb, patch=cfg.flat_patch, threshold=cfg.flat_threshold),
            "shannon_entropy": shannon_entropy(rgb),
            **{name: given.get(name, np.nan) for name in LEARNED},
        })
    # Models are built only when some image lacks a learned score (metadata-only runs load nothing).
    scorers = _scorers(scorer_factory, cfg) if any(len(given) < len(LEARNED) for given in known) else {}
    for name, fn in scorers.items():
        todo = [i for i, given in enumerate(known) if name not in given]
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start : start + cfg.batch_size]
            values = np.asarray(fn([images[i] for i in batch]), dtype=np.float64).reshape(-1)
            for i, value in zip(batch, values, strict=True):
                rows[i][name] = float(value)
    for row, given in zip(rows, known, strict=True):
        row["learned_from"] = ",".join(
            f"{name}:{'metadata' if name in given else ('model' if name in scorers else 'none')}" for name in LEARNED
        )
        for name in LEARNED:
            row[SCORER_COLUMN[name]] = ("metadata" if name in given else
                                        model_scorer_id(cfg, scorer_factory, name) if name in scorers else None)
    return rows


_Task = tuple[list[str], list[str], list[dict[str, float]], ScoringConfig, str, ScorerFactory]


def _score_chunk(task: _Task) -> Path:
    """Worker entry (top level so spawned processes can import it): score one chunk, write its part file."""
    keys, paths, known, cfg, part, factory = task
    rows = score_images([load_rgb(p) for p in paths], cfg, known, factory)
    frame = pd.DataFrame(rows)
    frame.insert(0, "key", keys)
    frame["scoring_hash"] = scoring_hash(cfg, factory)
    tmp = Path(part + ".tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, part)
    return Path(part)


def _known_scores(row: pd.Series, cfg: ScoringConfig) -> dict[str, float]:
    """Learned scores to take from the metadata instead of a model."""
    modes = {"qalign_score": cfg.qalign, "aesthetics_score": cfg.aesthetics}
    known = {}
    for name in LEARNED:
        value = row.get(name)
        present = value is not None and not pd.isna(value)
        if present and (cfg.reuse_metadata_scores or modes[name] == "metadata") and modes[name] != "none":
            known[name] = float(value)
    return known


def _atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def score_manifest(manifest: Path | str, out: Path | str, cfg: ScoringConfig | None = None,
                   progress: bool = True, scorer_factory: ScorerFactory = default_scorers) -> ScoreSummary:
    """Score the ``ok`` rows of an ingest manifest into ``out`` (parquet, one row per key), resuming.

    ``scorer_factory(cfg) -> {"qalign_score": fn, "aesthetics_score": fn}`` injects other learned scorers (e.g.
    a real Q-Align); with ``workers > 1`` it must be a module-level function so spawned workers can import it.
    """
    cfg = cfg or ScoringConfig()
    manifest, out = Path(manifest), Path(out)
    frame = read_manifest(manifest)
    base = manifest if manifest.is_dir() else manifest.parent
    digest = scoring_hash(cfg, scorer_factory)
    parts_dir = out.with_name(out.name + ".parts") / digest
    parts_dir.mkdir(parents=True, exist_ok=True)
    done: list[pd.DataFrame] = [pd.read_parquet(p) for p in sorted(parts_dir.glob("*.parquet"))]
    if out.is_file():
        previous = pd.read_parquet(out)
        if "scoring_hash" in previous and (previous["scoring_hash"] == digest).all():
            done.append(previous)
    done_keys = set().union(*(set(d["key"]) for d in done)) if done else set()
    todo = frame[~frame["key"].isin(done_keys)]
    tasks = []
    for start in range(0, len(todo), cfg.chunk_size):
        chunk = todo.iloc[start : start + cfg.chunk_size]
        keys = chunk["key"].tolist()
        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
        tasks.append((keys, [str(base / p) for p in chunk["path"]],
                      [_known_scores(row, cfg) for _, row in chunk.iterrows()],
                      cfg, str(parts_dir / f"part-{name}.parquet"), scorer_factory))
    bar = tqdm(total=len(todo), desc="score", unit="img", disable=not progress or not tasks)
    if cfg.workers == 1 or len(tasks) <= 1:
        for task in tasks:
            done.append(pd.read_parquet(_score_chunk(task)))
            bar.update(len(task[0]))
    else:
        # spawn, not fork: the parent may hold torch threads / OpenMP state that fork would corrupt.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=context) as pool:
            for task, part in zip(tasks, pool.map(_score_chunk, tasks), strict=True):
                done.append(pd.read_parquet(part))
                bar.update(len(task[0]))
    bar.close()
    scores = pd.concat(done, ignore_index=True) if done else pd.DataFrame(columns=list(SCORE_COLUMNS))
    scores = scores.drop_duplicates("key", keep="last")
    scores = frame[["key"]].merge(scores, on="key", how="left")  # manifest order, only current keys
    missing = scores["width"].isna().sum()
    if missing:
        raise UltraFluxError(f"{missing} images have no scores after scoring; rerun `ultraflux data score`")
    _atomic_parquet(scores[list(SCORE_COLUMNS)], out)
    shutil.rmtree(out.with_name(out.name + ".parts"), ignore_errors=True)
    means = {c: float(scores[c].mean()) for c in ("flat_percentage", "shannon_entropy", *LEARNED)
             if scores[c].notna().any()}
    return ScoreSummary(images=len(scores), scored_now=len(todo), reused=len(frame) - len(todo), means=means)
