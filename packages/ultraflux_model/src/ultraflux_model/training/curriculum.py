"""Stage-wise Aesthetic Curriculum: which data, timestep band and starting weights each stage uses.

Stage 1 trains on everything over the whole timestep range; stage 2 continues from stage 1's export on
the top share by aesthetics in the high-noise band (docs/design.md §3 SACL). Stages are config, so a run may
have any number of them; each starts from the previous stage's consolidated export. A stage's band is given
directly (t_min/t_max) or as the paper writes it (``paper_band``, scheduler timesteps) read through
``train.timesteps.band_reading`` (docs/training.md, "Paper facts and our readings").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ultraflux_core.errors import UltraFluxError

from ultraflux_model.config import SCHEDULER_STEPS, BandReading, StageConfig, TimestepConfig, TrainConfig

EXPORT_DIR = "export"
TRANSFORMER_DIR = "transformer"
EMA_EXPORT_DIR = "export_ema"
DONE_MARKER = "DONE"  # in the stage folder once its final export is complete


def paper_band_sigmas(band: tuple[int, int], reading: BandReading, steps: int = SCHEDULER_STEPS) -> tuple[float, float]:
    """The σ band (t_min, t_max) of the scheduler timesteps ``band`` = (first, last) of ``steps``, read as ``reading``.

    The training scheduler (diffusers FlowMatchEuler, FLUX.1-dev's unshifted training schedule) holds, for index
    i = 0 … steps−1, ``timesteps[i] = steps − i`` and ``sigmas[i] = 1 − i/steps`` (descending: index 0 is pure
    noise). ``sigma_high``: the numbers are indices i, as the training scripts draw them
    (``timesteps = scheduler.timesteps[(u·steps).long()]``), so σ ∈ [1 − last/steps, 1 − first/steps]; "0–459" is
    σ ≥ 0.541, the high-noise end the abstract names. ``index_low``: the numbers are timestep values σ·steps (the
    paper's Eq. 9, where a lower t is less noise), so σ ∈ [first/steps, last/steps]; "0–459" is σ ≤ 0.459.
    """
    first, last = band
    if reading == "sigma_high":
        return (steps - last) / steps, (steps - first) / steps
    return first / steps, last / steps


def stage_band(stage: StageConfig, cfg: TimestepConfig) -> tuple[float, float]:
    """The stage's band (t_min, t_max): its ``paper_band`` read by ``cfg.band_reading``, else its t_min/t_max."""
    if stage.paper_band is None:
        return stage.t_min, stage.t_max
    return paper_band_sigmas(stage.paper_band, cfg.band_reading)


@dataclass(frozen=True)
class StagePlan:
    """Where a stage reads its starting weights and writes its outputs."""

    index: int
    stage: StageConfig
    dir: Path  # <run_dir>/<stage name>: checkpoints/, export/, export_ema/, metrics.jsonl
    init_from: Path  # a diffusers transformer directory
    band: tuple[float, float] = (0.0, 1.0)  # (t_min, t_max) the stage draws t in (:func:`stage_band`)
    init_adapter: Path | None = None  # LoRA: the previous stage's adapter folder the adapters start from

    @property
    def start_marker(self) -> Path:
        """The file that exists once the weights this stage starts from are complete."""
        if self.init_adapter is not None:
            from ultraflux_model.lora.adapters import META_FILE

            return self.init_adapter / META_FILE
        return self.init_from / "config.json"

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def export(self) -> Path:
        """A complete checkpoint: the base checkpoint with this stage's trained transformer; with
        ``train.method: lora`` an adapter folder (``ultraflux_model.lora.adapters``) instead."""
        return self.dir / EXPORT_DIR

    @property
    def export_ema(self) -> Path:
        """The same with the EMA weights as the transformer."""
        return self.dir / EMA_EXPORT_DIR

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def done(self) -> bool:
        """The stage ran to its last step and its final export is complete."""
        return (self.dir / DONE_MARKER).is_file()

    def losses(self) -> dict[int, float]:
        """step → logged loss (the last row of a step wins after a resume); empty before the first step."""
        losses: dict[int, float] = {}
        if self.metrics.is_file():
            for line in self.metrics.read_text().splitlines():
                row = json.loads(line)
                losses[row["step"]] = row["loss"]
        return losses


def stage_plans(train: TrainConfig) -> list[StagePlan]:
    """One plan per configured stage; stage k > 0 starts from stage k−1's exported (non-EMA) transformer, or with
    LoRA from the base transformer with stage k−1's exported (non-EMA) adapters."""
    plans: list[StagePlan] = []
    base = Path(train.model) / TRANSFORMER_DIR
    init_from, init_adapter = base, None
    for index, stage in enumerate(train.stages):
        plan = StagePlan(index=index, stage=stage, dir=Path(train.run_dir) / stage.name, init_from=init_from,
                         band=stage_band(stage, train.timesteps), init_adapter=init_adapter)
        plans.append(plan)
        if train.method == "lora":
            init_adapter = plan.export
        else:
            init_from = plan.export / TRANSFORMER_DIR
    return plans


def find_stage(train: TrainConfig, name: str) -> StagePlan:
    """The plan of the stage called ``name``."""
    for plan in stage_plans(train):
        if plan.stage.name == name:
            return plan
    raise UltraFluxError(f"no stage named {name!r}; configured stages: {[s.name for s in train.stages]}")


def stages_to_run(train: TrainConfig, *, resume: bool = False, only: list[str] | None = None) -> list[StagePlan]:
    """The stages a run trains, in order: all of them, or those named in ``only``; with ``resume`` the finished
    ones are skipped (an interrupted one continues from its latest checkpoint)."""
    unknown = sorted(set(only or ()) - {s.name for s in train.stages})
    if unknown:
        raise UltraFluxError(f"unknown stage(s) {unknown}; configured stages: {[s.name for s in train.stages]}")
    return [plan for plan in stage_plans(train)
            if (not only or plan.stage.name in only) and not (resume and plan.done)]
