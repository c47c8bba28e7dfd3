"""The benchmark grid, one cell at a time: every prompt at every aspect ratio, once per seed.

What the evaluation generates (its spec is the eval package's; these take plain values). A *cell* is one
(prompt, seed, aspect ratio) image; its PNG and JSON sidecar have a deterministic name,
``<out_dir>/seed<seed>/<aspect with ':' as 'x'>/<prompt index>_<W>x<H>_seed<image seed>.png``, so the layout
names what each image is and a re-run finds what an earlier (killed) run finished.

This module is the per-cell work only; where the cells run (this process, or a Ray Data actor pool) is the compute
engine's business (``ultraflux_data.benchmark``, docs/design.md §8). A cell is written so that a kill at any moment
leaves it either finished or visibly unfinished: the PNG goes into place by one rename, then the sidecar, which
holds the PNG's sha256 and the cell's request, by another. :func:`finished_cell` trusts a cell only when both agree,
so a half-written, truncated or replaced PNG, a missing sidecar, or a cell made for other settings or weights is
generated again.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

from ultraflux_core.errors import UltraFluxError
from ultraflux_core.files import atomic_bytes, file_sha256, link_or_copy

from ultraflux_model.checkpoint.layout import fingerprint
from ultraflux_model.checkpoint.resolve import resolve_checkpoint
from ultraflux_model.config import GenerateConfig, SeedPolicy
from ultraflux_model.inference.pipeline import GeneratedImage, generate, load_pipeline

# Settings that do not change a cell's pixels: the grid sets prompts, sizes, seeds and the output folder itself, and
# the model is recorded (with its content hash) beside them.
_NOT_PIXELS = {"model", "prompts", "sizes", "seed", "out"}


@dataclass(frozen=True)
class GridImage:
    """One generated image of the grid and the aspect ratio (its label, e.g. ``16:9``) it was generated at."""

    image: GeneratedImage
    aspect: str


@dataclass(frozen=True)
class GridCell:
    """One (prompt, seed, aspect ratio) of the grid. ``seed`` is the image's seed (``grid_seed``, or
    ``grid_seed + prompt_index`` under the ``per_prompt`` policy)."""

    prompt_index: int
    prompt: str
    grid_seed: int
    seed: int
    aspect: str
    width: int
    height: int

    @property
    def relpath(self) -> Path:
        """The PNG's path under the grid's folder (the sidecar is the same path with ``.json``)."""
        folder = Path(f"seed{self.grid_seed}") / self.aspect.replace(":", "x")
        return folder / f"{self.prompt_index:04d}_{self.width}x{self.height}_seed{self.seed}.png"


def grid_cells(
    prompts: Sequence[str], aspects: Sequence[tuple[str, int, int]], seeds: Sequence[int],
    seed_policy: SeedPolicy = "fixed",
) -> list[GridCell]:
    """Every cell of ``prompts`` × ``aspects`` (``(label, width, height)``) × ``seeds``, seed-major, then aspect,
    then prompt. Within a (seed, aspect) every prompt gets the seed (``"fixed"``, the official inference's protocol)
    or prompt k gets seed + k (``"per_prompt"``)."""
    if seed_policy not in get_args(SeedPolicy):
        raise UltraFluxError(f"seed policy must be one of {list(get_args(SeedPolicy))}, got {seed_policy!r}")
    if not prompts:
        raise UltraFluxError("the grid has no prompts")
    cells = [
        GridCell(k, prompt, seed, seed + k if seed_policy == "per_prompt" else seed, label, width, height)
        for seed in seeds for label, width, height in aspects for k, prompt in enumerate(prompts)
    ]
    paths = [c.relpath for c in cells]
    if len(set(paths)) != len(paths):
        raise UltraFluxError("the grid names a cell twice: seeds and aspect-ratio labels must be unique")
    return cells


def _content_hash(reference: str | None) -> str | None:
    """The content hash of a local checkpoint directory; None for a registry URI or a hub id (named by reference)."""
    return fingerprint(Path(reference)) if reference is not None and Path(reference).is_dir() else None


@dataclass(frozen=True)
class GridJob:
    """What every cell of one grid run shares. Build it with :meth:`create` on the driver: local directories are made
    absolute (Ray actors have another working directory) and their weights hashed once, so a cell made from other
    weights in the same folder is not taken as finished."""

    model: str
    settings: GenerateConfig
    out_dir: Path
    tracking_uri: str | None = None
    weights: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def create(cls, model: str, settings: GenerateConfig, out_dir: Path | str,
               tracking_uri: str | None = None) -> GridJob:
        def absolute(ref: str | None) -> str | None:
            return str(Path(ref).resolve()) if ref is not None and Path(ref).is_dir() else ref

        settings = settings.model_copy(update={"transformer": absolute(settings.transformer)})
        weights = {"model_hash": _content_hash(model), "transformer_hash": _content_hash(settings.transformer)}
        return cls(absolute(model) or model, settings, Path(out_dir).resolve(), tracking_uri, weights)

    def request(self, cell: GridCell) -> dict[str, Any]:
        """What a cell is made of (JSON values): the cell, the weights and every setting that shapes its pixels."""
        settings = self.settings.model_dump(mode="json", exclude=_NOT_PIXELS)
        return json.loads(json.dumps({"cell": asdict(cell), "model": self.model, **self.weights, "settings": settings}))


def finished_cell(job: GridJob, cell: GridCell) -> GridImage | None:
    """The cell's image when a run already finished it: its sidecar names this request and the sha256 of the PNG
    on disk; else None (never written, half-written, changed afterwards, or made for another request)."""
    png = job.out_dir / cell.relpath
    try:
        sidecar = json.loads(png.with_suffix(".json").read_text(encoding="utf-8"))
        if not isinstance(sidecar, dict) or sidecar.get("request") != job.request(cell):
            return None
        if file_sha256(png) != sidecar.get("png_sha256"):
            return None
    except (OSError, ValueError):
        return None
    return GridImage(GeneratedImage(png, cell.prompt, cell.width, cell.height, cell.seed, sidecar), cell.aspect)


class GridWorker:
    """Loads the pipeline once (in this process, or once per Ray actor), then writes one cell per call.

    ``functools.partial(GridWorker, job)`` is the picklable worker factory the compute engine takes.
    """

    def __init__(self, job: GridJob) -> None:
        self.job = job
        settings = job.settings
        self.pipe = load_pipeline(
            resolve_checkpoint(job.model, job.tracking_uri), dtype=settings.dtype, offload=settings.offload,
            transformer=settings.transformer,
        )

    def __call__(self, cell: GridCell) -> GridImage:
        job, settings = self.job, self.job.settings
        png = job.out_dir / cell.relpath
        png.parent.mkdir(parents=True, exist_ok=True)
        # generate() names its files by batch index: it writes into a private folder beside the cell, from which the
        # PNG is renamed into place (removed with its folder if the call fails; left hidden after a kill)
        with tempfile.TemporaryDirectory(prefix=f".{png.stem}.", dir=png.parent) as staging:
            (image,) = generate(
                job.model, [cell.prompt], [(cell.width, cell.height)], steps=settings.steps,
                guidance=settings.guidance, shift=settings.shift, seed=cell.seed, dtype=settings.dtype,
                offload=settings.offload, vae_decode=settings.vae_decode,
                max_sequence_length=settings.max_sequence_length, out_dir=Path(staging), pipe=self.pipe,
                progress=False, seed_policy="fixed",
            )
            sidecar = {**image.sidecar, "request": job.request(cell), "png_sha256": file_sha256(image.path)}
            png.with_suffix(".json").unlink(missing_ok=True)  # an old sidecar never vouches for the new PNG
            link_or_copy(image.path, png)
            atomic_bytes(png.with_suffix(".json"), (json.dumps(sidecar, indent=2) + "\n").encode())
        return GridImage(GeneratedImage(png, cell.prompt, cell.width, cell.height, cell.seed, sidecar), cell.aspect)
