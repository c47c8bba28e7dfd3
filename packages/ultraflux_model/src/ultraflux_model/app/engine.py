"""What the web app does, without the web: load models once, guard requests, generate with progress and
cancellation, compare two models on the same prompt and seed, list what was made.

Kept apart from the Gradio layout (``studio.py``) so every behaviour is a plain function call.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch
from ultraflux_core.errors import UltraFluxError

from ultraflux_model.checkpoint.layout import fingerprint
from ultraflux_model.checkpoint.resolve import resolve_checkpoint
from ultraflux_model.config import (
    AccelConfig,
    CacheMode,
    CompileMode,
    Dtype,
    Offload,
    QuantizeMode,
    ServeConfig,
    VaeDecodeMode,
)
from ultraflux_model.inference.accel import check_accel
from ultraflux_model.inference.limits import check_lora, check_prompts, check_request, check_settings
from ultraflux_model.inference.pipeline import GeneratedImage, StepCallback, UltraFluxPipeline, generate, load_pipeline
from ultraflux_model.inference.runs import new_run_dir
from ultraflux_model.lora.apply import Adapter, base_fingerprints, check_base, read_adapter

SIDES = ("model", "compare")
# An absolute path in a message ("/etc/…", "'/root/x'"), but not "models:/…", "1/steps" or a URL's "//".
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/[^\s'\"(),;]+")


CANCEL_MEMORY_S = 86_400.0  # how long a session's Cancel is remembered


class Cancelled(UltraFluxError):
    """Raised from the step callback when the user pressed Cancel: sampling stops at the next step."""


@dataclass(frozen=True)
class Request:
    """One press of Generate (or one API call)."""

    prompt: str
    width: int
    height: int
    steps: int = 28
    guidance: float = 4.0
    seed: int = 0
    images: int = 1
    dtype: Dtype = "fp32"
    offload: Offload = "none"
    vae_decode: VaeDecodeMode = "tiled"
    cache: CacheMode = "none"
    compile: CompileMode = "none"
    quantize: QuantizeMode = "none"
    lora: str | None = None  # one of the app's adapters by name (the main model only); None: none
    lora_scale: float = 1.0


ACCEL_CHOICES = {"cache": CacheMode, "compile": CompileMode, "quantize": QuantizeMode}  # what a Request may pick


@dataclass
class ModelSlot:
    """A model reference and the one pipeline loaded for it (reloaded only when dtype/offload change)."""

    ref: str
    transformer: str | None = None
    pipe: UltraFluxPipeline | None = None
    loaded_as: tuple[str, ...] | None = None

    @property
    def label(self) -> str:
        """``ref`` plus the first 12 hex of the checkpoint's content hash (what the sidecars record)."""
        if self.pipe is None:
            return self.ref
        root = self.pipe.checkpoint_root  # type: ignore[attr-defined]
        extra = f" + transformer {self.transformer}" if self.transformer else ""
        return f"{self.ref}{extra} (sha256 {fingerprint(root)[:12]})"


def hide_paths(text: str) -> str:
    """``text`` with every absolute server path replaced by ``<server path>`` (what the page and API clients see)."""
    return _ABSOLUTE_PATH.sub("<server path>", text)


def shown(text: str) -> str:
    """``text`` for the page itself: each absolute server path cut to its last component (the page, its
    screenshots and shared links show no machine paths; the operator who started the server knows them)."""
    return _ABSOLUTE_PATH.sub(lambda m: Path(m.group(0)).name or "<server path>", text)


def friendly_error(err: BaseException) -> str:
    """One line for the user, no traceback and no server path: our own messages as they are, memory errors with
    what to change."""
    return hide_paths(_one_line(err))


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in text.lower() or "can't allocate" in text:
        return (
            "out of memory: use offload 'model' or 'sequential' (Advanced settings), keep the VAE decode 'tiled', "
            f"or choose a smaller size ({text[:160]})"
        )
    if isinstance(err, UltraFluxError):
        return text
    return f"generation failed ({type(err).__name__}: {text[:300]})"


class Studio:
    """Models loaded once, one job on the device at a time, per-session cancellation.

    The second model of a comparison is one of ``compare`` (the models the server was started with), chosen per
    request: clients never name a path, and one user's choice never changes another's. The same holds for LoRA
    adapters: ``lora`` lists the adapter folders the app offers (by folder name, checked against the main model when
    it loads); a request picks one by name with a scale, and it applies to the main model only.
    """

    def __init__(
        self,
        model: str,
        *,
        out: Path,
        limits: ServeConfig | None = None,
        compare: str | Sequence[str] | None = None,
        transformer: str | None = None,
        device: str | None = None,
        lora: Sequence[str] = (),
        accel: AccelConfig | None = None,
    ) -> None:
        self.out = Path(out)
        # The thresholds of the caches; a request picks cache, compile and quantize, never parallelism.
        self.accel = (accel or AccelConfig()).model_copy(update={"parallel": "none"})
        self.out.mkdir(parents=True, exist_ok=True)
        self.limits = limits or ServeConfig()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.default_dtype: Dtype = "bf16" if self.device.startswith("cuda") else "fp32"
        self.main = ModelSlot(model, transformer)
        refs = [compare] if isinstance(compare, str) else list(compare or ())
        self.seconds: dict[str, ModelSlot] = {ref: ModelSlot(ref) for ref in dict.fromkeys(r for r in refs if r)}
        adapters = [read_adapter(path) for path in lora]
        self.adapters: dict[str, Adapter] = {adapter.name: adapter for adapter in adapters}
        if len(self.adapters) != len(adapters):
            raise UltraFluxError("two LoRA adapters share a folder name: the picker lists them by name; rename one")
        # Gradio's concurrency limit stops a second job from starting, but a cancelled job's thread runs on
        # until its next step; this lock keeps the device to one job even then.
        self._device_lock = threading.Lock()
        # session → time.monotonic() of its latest Cancel. A Cancel stops the session's jobs submitted before it,
        # whenever they reach the engine (a time, not a flag a starting job clears: a job's thread may start
        # after the Cancel that was meant for it).
        self._cancelled_at: dict[str, float] = {}
        self._cancel_lock = threading.Lock()

    # -- models -----------------------------------------------------------------------------------------
    @property
    def compare_choices(self) -> list[str]:
        """The models a comparison may use (the Compare tab's dropdown), first one the default."""
        return list(self.seconds)

    @property
    def lora_choices(self) -> list[str]:
        """The adapters a request may name (the LoRA picker)."""
        return list(self.adapters)

    def slots(self) -> list[tuple[str, ModelSlot]]:
        """Every model of the app as ``(side, slot)``: the main model, then each second model."""
        return [("model", self.main)] + [("compare", slot) for slot in self.seconds.values()]

    def slot(self, side: str = "model", second: str | None = None) -> ModelSlot:
        """The main model, or the second model ``second`` (default: the first one) when ``side`` is "compare".

        A ``second`` not given on the command line is refused without naming it: a client's text never reaches the
        filesystem, and the message cannot tell which paths exist.
        """
        if side == "model":
            return self.main
        if not self.seconds:
            raise UltraFluxError("no second model: start the app with --compare MODEL")
        if second is None or second == "":
            return next(iter(self.seconds.values()))
        if second not in self.seconds:
            raise UltraFluxError(
                f"unknown second model: choose one of the {len(self.seconds)} model(s) this server was started with "
                "(the Compare tab's dropdown)"
            )
        return self.seconds[second]

    def load(
        self, side: str = "model", dtype: Dtype | None = None, offload: Offload = "none", second: str | None = None,
        accel: AccelConfig | None = None,
    ) -> ModelSlot:
        """Load ``side``'s pipeline unless it is already loaded with this dtype, offload, compile and quantize."""
        slot = self.slot(side, second)
        accel = accel or self.accel
        key = (dtype or self.default_dtype, offload, accel.compile, accel.quantize)
        if slot.pipe is None or slot.loaded_as != key:
            slot.pipe = None  # free the old weights before loading the new ones
            slot.pipe = load_pipeline(
                slot.ref, dtype=key[0], offload=offload, device=self.device, transformer=slot.transformer, accel=accel
            )
            slot.loaded_as = key
            if slot is self.main and self.adapters:  # an adapter of another model fails at start, not per request
                allowed = base_fingerprints(slot.pipe.checkpoint_root, slot.pipe.transformer_root)  # type: ignore[attr-defined]
                for adapter in self.adapters.values():
                    check_base(adapter, allowed)
        return slot

    # -- cancellation -----------------------------------------------------------------------------------
    def cancel(self, session: str) -> None:
        """Stop the jobs of ``session`` submitted until now at their next denoising step (see ``since`` of
        :meth:`generate`); later jobs of the session are not touched."""
        now = time.monotonic()
        with self._cancel_lock:
            # a day-old Cancel can only concern a job submitted a day ago: forgotten, so the table stays small
            self._cancelled_at = {s: t for s, t in self._cancelled_at.items() if now - t < CANCEL_MEMORY_S}
            self._cancelled_at[session] = now

    def _check_cancel(self, session: str, since: float) -> None:
        with self._cancel_lock:
            if self._cancelled_at.get(session, -math.inf) >= since:
                raise Cancelled("cancelled")

    # -- generation -------------------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """The shared request guard (sizes, ceilings, steps, guidance, seeds) plus the prompt."""
        check_prompts([request.prompt])
        check_request(self.limits, [(request.width, request.height)], images=request.images)
        check_settings(self.limits, steps=request.steps, guidance=request.guidance, seed=request.seed,
                       images=request.images)  # fmt: skip
        check_lora(self.adapters, request.lora, request.lora_scale)
        check_accel(self.accel_for(request), torch.device(self.device), request.offload)

    def accel_for(self, request: Request) -> AccelConfig:
        """The server's accelerator settings with the request's cache, compile and quantize."""
        for name, kind in ACCEL_CHOICES.items():
            if getattr(request, name) not in get_args(kind):
                raise UltraFluxError(f"{name} must be one of {list(get_args(kind))}, got {getattr(request, name)!r}")
        return self.accel.model_copy(update={name: getattr(request, name) for name in ACCEL_CHOICES})

    def new_run_dir(self) -> Path:
        """A fresh directory under ``out`` per request, so requests never overwrite each other's files."""
        run = new_run_dir(self.out)
        run.mkdir(parents=True)  # at once: Cancel and failures remove it only while it is empty
        return run

    def _drop_empty(self, run: Path) -> None:
        """Remove ``run`` and its parents up to ``out`` while they are empty (a cancelled or failed request)."""
        run = Path(run)
        while run != self.out and run.is_relative_to(self.out):
            try:
                run.rmdir()  # only an empty directory goes; anything written stays
            except OSError:
                return
            run = run.parent

    def generate(
        self,
        request: Request,
        *,
        side: str = "model",
        session: str = "",
        progress: StepCallback | None = None,
        run_dir: Path | None = None,
        second: str | None = None,
        since: float | None = None,
    ) -> list[GeneratedImage]:
        """Generate ``request.images`` images (seeds ``seed … seed+images-1``) with one model (``second`` picks the
        compare side's model, see :meth:`slot`).

        ``progress(phase, done, total)`` sees every step. ``since``: when the job was submitted
        (``time.monotonic()``; default: now); a Cancel from ``session`` from then on stops it at its next step.
        """
        since = time.monotonic() if since is None else since
        self.check(request)

        def on_step(phase: str, done: int, total: int) -> None:
            self._check_cancel(session, since)
            if progress is not None:
                progress(phase, done, total)

        name, scale = check_lora(self.adapters, request.lora, request.lora_scale)
        adapters = [(self.adapters[name], scale)] if name and side == "model" else []
        run = run_dir or self.new_run_dir()
        try:
            with self._device_lock:
                accel = self.accel_for(request)
                slot = self.load(side, request.dtype, request.offload, second, accel)
                return generate(
                    slot.ref,
                    [request.prompt],
                    [(request.width, request.height)] * request.images,
                    steps=request.steps,
                    guidance=request.guidance,
                    seed=request.seed,
                    dtype=request.dtype,
                    offload=request.offload,
                    vae_decode=request.vae_decode,
                    out_dir=run,
                    pipe=slot.pipe,
                    progress=False,
                    callback=on_step,
                    transformer=slot.transformer,
                    limits=self.limits,
                    lora=adapters,
                    accel=accel,
                )
        except BaseException:
            self._drop_empty(run)  # a cancelled or failed job leaves no empty run folder behind
            raise

    def compare(
        self,
        request: Request,
        *,
        session: str = "",
        progress: StepCallback | None = None,
        second: str | None = None,
        since: float | None = None,
    ) -> dict[str, tuple[GeneratedImage, dict[str, Any]]]:
        """The same prompt and seed on the main model and ``second`` (one of :attr:`compare_choices`, default the
        first); each image's sidecar gains its side, label and scores. ``since`` as in :meth:`generate`: one
        Cancel stops the pair."""
        since = time.monotonic() if since is None else since
        self.slot("compare", second)  # refuse an unknown model before writing anything
        single = Request(**{**request.__dict__, "images": 1})
        self.check(single)
        self.load_both(single, second)  # a broken second model fails now, not after the first image
        run = self.new_run_dir()
        results: dict[str, tuple[GeneratedImage, dict[str, Any]]] = {}
        try:
            for side in SIDES:
                image = self.generate(single, side=side, session=session, progress=progress, run_dir=run / side,
                                      second=second, since=since)[0]  # fmt: skip
                label = self.slot(side, second).label
                sidecar = {**image.sidecar, "side": side, "model_label": label, "scores": scores(image.path)}
                image.path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
                results[side] = (image, sidecar)
        except BaseException:
            self._drop_empty(run)
            raise
        return results

    def resolve_models(self, second: str | None = None, *, every: bool = False) -> None:
        """Resolve the main model and the second one (``second``, or every second model when ``every``) to local
        checkpoints before anything is loaded or generated: a typo in either fails at once, with one line naming
        the side. Resolved folders are verified copies in the model cache, so the load that follows reuses them."""
        seconds = list(self.seconds.values()) if every else [self.slot("compare", second)]
        pending = [("main", self.main)] + [("second", slot) for slot in seconds]
        for name, slot in pending:
            if slot.pipe is not None:
                continue
            try:
                resolve_checkpoint(slot.ref)
            except UltraFluxError as err:
                raise UltraFluxError(f"{name} model: {err}") from None

    def load_both(self, request: Request, second: str | None = None) -> None:
        """Resolve both models of a comparison, then load them, before anything is generated."""
        self.resolve_models(second)
        with self._device_lock:
            for side in SIDES:
                self.load(side, request.dtype, request.offload, second, self.accel_for(request))


def request_from_sidecar(sidecar: dict[str, Any], default_dtype: Dtype = "fp32") -> Request:
    """The request that made a gallery image (same prompt, size, steps, guidance, seed, dtype, decode), for one
    image: pressing Generate with it makes that image again. ``UltraFluxError`` when the sidecar lacks a field."""
    try:
        return Request(
            prompt=str(sidecar["prompt"]), width=int(sidecar["width"]), height=int(sidecar["height"]),
            steps=int(sidecar["steps"]), guidance=float(sidecar["guidance"]), seed=int(sidecar["seed"]), images=1,
            dtype=sidecar.get("dtype", default_dtype), offload=sidecar.get("offload", "none"),
            vae_decode=sidecar.get("vae_decode", "tiled"),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as err:
        raise UltraFluxError(f"this image has no usable settings sidecar (missing or bad {err}): pick one made "
                             "here") from None


def scores(path: Path) -> dict[str, float]:
    """The weight-free image scores of ``ultraflux_eval.metrics.scores`` (the paper's detail metrics and the
    filters')."""
    from ultraflux_eval.metrics import scores as s

    return {
        "glcm": round(s.glcm_score(path), 4),
        "compression_ratio": round(s.compression_ratio(path), 4),
        "shannon_entropy": round(s.shannon_entropy(path), 4),
        "flat_percentage": round(s.flat_percentage(path), 4),
    }


def list_outputs(out: Path, limit: int = 200) -> list[tuple[Path, dict[str, Any]]]:
    """Every image under ``out`` with its sidecar, newest first (at most ``limit``)."""
    images = [p for p in Path(out).rglob("*.png") if not p.name.endswith(".tmp.png")]
    images.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
    return [(path, read_sidecar(path)) for path in images[:limit]]


def read_sidecar(image: Path) -> dict[str, Any]:
    """The JSON beside ``image``; empty for an image written by something else or a sidecar being written."""
    try:
        return dict(json.loads(image.with_suffix(".json").read_text()))
    except (OSError, ValueError):
        return {}
