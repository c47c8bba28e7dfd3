"""Score every ingested image, in parallel processes, into one resumable parquet.

Weight-free scores come from ``ultraflux_eval.metrics.scores`` (the one implementation shared with evaluation):
resolution, aspect ratio, flat percentage, Shannon entropy. Learned scores (Q-Align, aesthetics by ArtiMuse or
the LAION head) come from the evaluation's own scorers (``ultraflux_eval.metrics.aesthetic.image_scorer``) with the
backbones the config selects (tiny random ones of the real architectures in CI, local weights in production);
when the metadata already carries them (``reuse_metadata_scores``) they are taken from there instead.

Work is cut into deterministic partitions (key-hash ranges, ``compute.partition_size`` images each) that
``ultraflux_data.compute`` runs in this process or on Ray (an actor pool, so learned scorers load once per
actor and may hold a GPU). Each finished partition is written atomically as a part file under
``<out>.parts/<scoring-hash>/``, so a killed run resumes with the partitions it had not finished, a concurrent
run waits on a partition's lock and then skips it, and a change of scoring settings (new hash) never reuses
stale scores. An image that cannot be decoded any more is quarantined (``<out stem>.quarantine.parquet``, with
the reason) instead of failing its partition.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel
from ultraflux_core.errors import UltraFluxError
from ultraflux_eval.errors import EvalError
from ultraflux_eval.metrics.scores import flat_and_entropy, load_rgb

from ultraflux_data.compute import map_partitions
from ultraflux_data.config import ComputeConfig, ScoringConfig
from ultraflux_data.ingest import read_manifest
from ultraflux_data.partitions import atomic_parquet, content_hash, part_name, partition_lock, split_by_key

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
    quarantined: int = 0
    means: dict[str, float]


# The identity of the default scorers in the hash: the path they had when score caches were first written. Moving
# the code (it now lives in ultraflux_data) must not make every existing scores.parquet look stale and re-run
# Q-Align and ArtiMuse over the whole dataset; a change of what they compute changes the settings in the hash.
DEFAULT_SCORERS_ID = "ultraflux_model.data.scoring.default_scorers"


def scoring_hash(cfg: ScoringConfig, factory: Callable | None = None) -> str:
    """Short hash of what changes score values: the settings (not batching or device) and the scorer factory."""
    relevant = cfg.model_dump(mode="json", exclude={"batch_size", "device"})
    factory = factory or default_scorers
    relevant["factory"] = (DEFAULT_SCORERS_ID if factory is default_scorers
                           else f"{factory.__module__}.{factory.__qualname__}")
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


# the eval metric behind each data.scoring.aesthetics_scorer
AESTHETIC_METRICS = {"artimuse": "artimuse", "laion": "aesthetic"}


def _learned(cfg: ScoringConfig) -> dict[str, tuple[str, str, str]]:
    """Score column → (scorer name, eval metric, backbone source) of the learned scores ``cfg`` computes."""
    wanted = {}
    if cfg.aesthetics in ("tiny", "local"):
        wanted["aesthetics_score"] = (cfg.aesthetics_scorer, AESTHETIC_METRICS[cfg.aesthetics_scorer], cfg.aesthetics)
    if cfg.qalign in ("tiny", "local"):
        wanted["qalign_score"] = ("qalign", "qalign", cfg.qalign)
    return wanted


def default_scorers(cfg: ScoringConfig) -> dict[str, ScoreFn]:
    """The learned scorers ``cfg`` asks for, keyed by score column: the evaluation's own scorers
    (``ultraflux_eval.metrics.aesthetic.image_scorer``) on tiny random backbones or on ``weights_dir``
    (sha256-verified).

    ``aesthetics``: ArtiMuse (the paper's top-30 % / top-5 % ranking) or the LAION head; ``qalign``: Q-Align.
    """
    # imported here: weight-free-only workers then never pay for importing torch
    from ultraflux_eval.backbones.loading import backbones_from_config
    from ultraflux_eval.metrics.aesthetic import image_scorer

    scorers: dict[str, ScoreFn] = {}
    for column, (_, metric, source) in _learned(cfg).items():
        nets = backbones_from_config(source, cfg.weights_dir, [metric], fid_size=64)
        scorers[column] = image_scorer(metric, nets, cfg.batch_size, cfg.device).score
    return scorers


ScorerFactory = Callable[[ScoringConfig], dict[str, ScoreFn]]


def model_scorer_id(cfg: ScoringConfig, factory: Callable, column: str) -> str:
    """Id of the scorer a factory uses for ``column``: backbone and weights source, so scores from different
    networks (tiny vs local weights, LAION vs another head) never look alike."""
    if factory is default_scorers:
        name, _, source = _learned(cfg)[column]
        return f"{name}:{source}" + (f":{cfg.weights_dir}" if source == "local" else "")
    return f"{factory.__module__}.{factory.__qualname__}:{column}"


@functools.lru_cache(maxsize=4)
def _scorers(factory: ScorerFactory, cfg: ScoringConfig) -> dict[str, ScoreFn]:
    """Built once per process (each Ray actor builds its own)."""
    return factory(cfg)


def score_images(images: Sequence[np.ndarray], cfg: ScoringConfig,
                 known: Sequence[dict[str, float]] | None = None,
                 scorer_factory: ScorerFactory = default_scorers) -> list[dict]:
    """Scores of RGB uint8 arrays ``[H, W, 3]``; ``known[i]`` holds metadata scores to reuse for image ``i``."""
    known = known or [{} for _ in images]
    rows = []
    for rgb, given in zip(images, known, strict=True):
        height, width = rgb.shape[:2]
        flat, entropy = flat_and_entropy(rgb, patch=cfg.flat_patch, threshold=cfg.flat_threshold)
        rows.append({
            "width": width, "height": height, "aspect": width / height,
            "flat_percentage": flat, "shannon_entropy": entropy,
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


@dataclass(frozen=True)
class ScorePartition:
    """One partition's work: its images (absolute paths), metadata scores to reuse, and its part file."""

    out: Path
    keys: list[str]
    paths: list[str]
    known: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class ScoreWorker:
    """Scores partitions (the compute engine's worker; learned scorers are built on first use per process)."""

    cfg: ScoringConfig
    factory: ScorerFactory = default_scorers

    def __call__(self, part: ScorePartition) -> int:
        """Write ``part.out`` (one row per key; ``error`` names why an image was quarantined); returns the
        number of images scored now (0 when the part was already complete, e.g. written by a concurrent run)."""
        with partition_lock(part.out):
            if part.out.is_file():
                return 0
            decoded: list[np.ndarray] = []
            ok: list[int] = []
            errors = [""] * len(part.keys)
            for i, path in enumerate(part.paths):
                try:
                    decoded.append(load_rgb(path))
                    ok.append(i)
                except EvalError as err:  # changed or damaged since ingest: quarantine, keep the partition going
                    errors[i] = f"corrupt: {err}"
            rows = score_images(decoded, self.cfg, [part.known[i] for i in ok], self.factory) if ok else []
            by_index = dict(zip(ok, rows, strict=True))
            frame = pd.DataFrame([by_index.get(i, {}) for i in range(len(part.keys))],
                                 columns=[c for c in SCORE_COLUMNS if c not in ("key", "scoring_hash")])
            frame.insert(0, "key", part.keys)
            frame["scoring_hash"] = scoring_hash(self.cfg, self.factory)
            frame["error"] = errors
            atomic_parquet(frame, part.out)
            return len(ok)


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


def score_manifest(manifest: Path | str, out: Path | str, cfg: ScoringConfig | None = None,
                   progress: bool = True, scorer_factory: ScorerFactory = default_scorers,
                   compute: ComputeConfig | None = None) -> ScoreSummary:
    """Score the ``ok`` rows of an ingest manifest into ``out`` (parquet, one row per key), resuming.

    ``scorer_factory(cfg) -> {"qalign_score": fn, "aesthetics_score": fn}`` injects other learned scorers (e.g.
    a real Q-Align); with ``compute.engine=ray`` it must be importable by the Ray workers (a module-level function).
    """
    cfg, compute = cfg or ScoringConfig(), compute or ComputeConfig()
    manifest, out = Path(manifest).resolve(), Path(out).resolve()  # absolute: Ray workers may run elsewhere
    frame = read_manifest(manifest)
    base = manifest if manifest.is_dir() else manifest.parent
    digest = scoring_hash(cfg, scorer_factory)
    parts_dir = out.with_name(out.name + ".parts") / digest
    previous = _previous_scores(out, digest)
    frame = frame.assign(abs_path=[str(base / p) for p in frame["path"]])
    count, groups = split_by_key(frame, compute.partition_size)
    todo: list[ScorePartition] = []
    parts: list[Path] = []
    for index, rows in groups:
        keys = rows["key"].tolist()
        known = [_known_scores(row, cfg) for _, row in rows.iterrows()]
        path = parts_dir / part_name(index, count, content_hash([keys, rows["path"].tolist(), known]), ".parquet")
        parts.append(path)
        if path.is_file():
            continue
        if previous is not None and set(keys) <= set(previous.index):  # e.g. after `dvc checkout`: no parts left
            atomic_parquet(previous.loc[keys].reset_index().assign(error=""), path)
            continue
        todo.append(ScorePartition(path, keys, rows["abs_path"].tolist(), known))
    scored_now = sum(map_partitions(functools.partial(ScoreWorker, cfg, scorer_factory), todo, compute, gpu=True,
                                    desc="score", progress=progress))
    done = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if parts else pd.DataFrame(
        columns=[*SCORE_COLUMNS, "error"])
    bad = done[done["error"] != ""]
    scores = frame[["key"]].merge(done[done["error"] == ""], on="key", how="inner")  # manifest order
    quarantine = out.with_name(out.stem + ".quarantine.parquet")
    atomic_parquet(bad[["key", "error"]].rename(columns={"error": "reason"}).merge(
        frame[["key", "path"]], on="key", how="left"), quarantine)
    if len(scores) + len(bad) != len(frame):
        raise UltraFluxError(f"{len(frame) - len(scores) - len(bad)} images have no scores after scoring; "
                             "rerun `ultraflux data score`")
    atomic_parquet(scores[list(SCORE_COLUMNS)], out)
    means = {c: float(scores[c].mean()) for c in ("flat_percentage", "shannon_entropy", *LEARNED)
             if scores[c].notna().any()}
    return ScoreSummary(images=len(scores), scored_now=scored_now, reused=len(frame) - scored_now - len(bad),
                        quarantined=len(bad), means=means)


def _previous_scores(out: Path, digest: str) -> pd.DataFrame | None:
    """Rows of an existing ``out`` scored with the same settings, indexed by key (``None`` if there are none)."""
    if not out.is_file():
        return None
    previous = pd.read_parquet(out)
    if "scoring_hash" not in previous:
        return None
    previous = previous[previous["scoring_hash"] == digest]
    return previous.set_index("key") if len(previous) else None
