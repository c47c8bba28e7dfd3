"""UltraFlux Studio: the Gradio page over :class:`~ultraflux_model.app.engine.Studio`.

Left: the prompt and settings. Right: the result with its sidecar, the side-by-side comparison of two models,
and the gallery of everything in ``--out``. API endpoints for scripts: ``/generate`` (prompt, width, height, steps,
guidance, seed → image file, metadata JSON), ``/compare`` (same inputs, plus optionally the second model, one of the
app's ``--compare`` models → two images and both sides' metadata) and ``/cancel`` (stops the caller's own jobs
submitted before it, each at its next step). Every generation event shares one concurrency slot: one job on the device at a time. The queue
holds at most ``queue_size`` waiting jobs and one session at most ``session_jobs`` (checked when a job is submitted,
so one client cannot fill the queue); errors shown to clients are one line with no server path.
"""

from __future__ import annotations

import functools
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from ultraflux_model.app.engine import (
    Request,
    Studio,
    friendly_error,
    hide_paths,
    list_outputs,
    read_sidecar,
    request_from_sidecar,
    shown,
)
from ultraflux_model.app.sizes import ASPECTS, CUSTOM, FAMILIES, controls_for, preset_size, size_note
from ultraflux_model.config import MAX_LORA_SCALE
from ultraflux_model.inference.limits import whole_number
from ultraflux_model.inference.pipeline import StepCallback

DEVICE = "device"  # the concurrency id every event that runs a model shares
NO_LORA = "none"  # the LoRA picker's first entry
CSS = "#size-note p {margin: 0} footer {display: none !important}"


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn any failure into a one-line ``gr.Error`` (shown in the page, returned to API clients)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error as err:
            raise gr.Error(hide_paths(str(err.message)), print_exception=False) from None
        except Exception as err:  # noqa: BLE001 - the message is what the user needs; no traceback, no path
            raise gr.Error(friendly_error(err), print_exception=False) from None

    return wrapper


class Submissions:
    """When each accepted job was submitted, so that a Cancel stops exactly the session's jobs submitted before it
    (``since`` of :meth:`Studio.generate`), even one whose thread starts after the Cancel.

    Keyed by the job's HTTP request: Gradio hands the validator (run at submission) and the job the same request
    object. Weak keys: an entry goes with its request.
    """

    def __init__(self) -> None:
        self._at: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def stamp(self, request: gr.Request) -> None:
        if request.request is not None:
            with self._lock:
                self._at[request.request] = time.monotonic()

    def since(self, request: gr.Request | None) -> float | None:
        """The job's submission time; ``None`` (the engine then takes the job's start) when it was not stamped."""
        if request is None or request.request is None:
            return None
        with self._lock:
            return self._at.get(request.request)


def session_limit(demo: gr.Blocks, session_jobs: int, submissions: Submissions) -> Callable[..., Any]:
    """A Gradio validator that refuses a job while its session already has ``session_jobs`` jobs queued or running,
    and stamps the jobs it accepts in ``submissions``.

    Validators run when a job is submitted, before it joins the queue; the count is the queue's own record of the
    session's unfinished events (so a cancelled or finished job frees its place without bookkeeping of ours).
    Only the generation events are queued (everything else has ``queue=False``), so they are what is counted.
    """

    def validator(request: gr.Request, *inputs: Any) -> Any:  # Gradio inserts the request at its position
        pending = demo._queue.pending_event_ids_session.get(request.session_hash or "", ())
        verdicts = [gr.validate(True, "")] * len(inputs)  # Gradio wants one per input
        if len(pending) >= session_jobs:
            verdicts[0] = gr.validate(False, f"this session already has {len(pending)} job(s) queued or running (the "
                                             f"limit is {session_jobs}, ui.session_jobs): wait for one to finish")
        else:
            submissions.stamp(request)
        return verdicts

    return validator


def _notices(made: list[Any]) -> None:
    """Show each sidecar's notice (a prompt cut at 512 T5 tokens) as a warning: the image was still made."""
    for notice in dict.fromkeys(g.sidecar["notice"] for g in made if "notice" in g.sidecar):
        gr.Warning(notice)


def _progress(progress: gr.Progress, steps: int, images: int) -> StepCallback:
    """A step callback that drives the page's progress bar over ``images`` × (steps + decode)."""
    total = images * (steps + 1)
    done = [0]

    def callback(phase: str, k: int, n: int) -> None:
        if phase == "denoise":
            done[0] += 1
            desc = f"image {done[0] // (steps + 1) + 1}/{images}: denoising step {k}/{n}"
        elif k == 0:
            desc = "VAE decode"
        else:
            done[0] += 1
            desc = "decoded"
        progress((min(done[0], total), total), desc=desc, unit="steps")

    return callback


def status_line(state: str, detail: str = "") -> str:
    """The one-line job state under the buttons (``#status``): running, done, cancelled or failed."""
    icons = {"running": "⏳", "done": "✓", "cancelled": "⏹", "failed": "⚠"}
    return f"{icons[state]} **{state}**" + (f" · {detail}" if detail else "")


def _caption(sidecar: dict[str, Any]) -> str:
    return f"{sidecar.get('width')}×{sidecar.get('height')} · seed {sidecar.get('seed')} · {sidecar.get('prompt', '')[:60]}"


def _label(sidecar: dict[str, Any]) -> str:
    return (
        f"**{sidecar.get('side', '')}** `{shown(str(sidecar.get('model')))}` · sha256 `{str(sidecar.get('model_hash', ''))[:12]}`  \n"
        + " · ".join(f"{k} {v}" for k, v in sidecar.get("scores", {}).items())
    )


def gallery_items(out: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """The gallery's ``(image, caption)`` items, newest first, and the image paths in the same order."""
    listed = list_outputs(out)
    return [(str(p), _caption(s)) for p, s in listed], [str(p) for p, _ in listed]


def selected_item(paths: list[str], index: int) -> tuple[dict[str, Any], list[str]]:
    """The sidecar of the ``index``-th gallery image and the files to download (PNG, and its JSON if any)."""
    path = Path(paths[index])
    sidecar = path.with_suffix(".json")
    return read_sidecar(path), [str(path)] + ([str(sidecar)] if sidecar.is_file() else [])


def build_app(studio: Studio, *, default_steps: int = 28, queue_size: int = 16, session_jobs: int = 1) -> gr.Blocks:
    """The page with its queue; ``studio`` holds the loaded models and the output directory."""
    choices = studio.compare_choices
    submissions = Submissions()

    def refresh_gallery() -> tuple[list[tuple[str, str]], list[str]]:
        return gallery_items(studio.out)

    def show_selected(paths: list[str], evt: gr.SelectData) -> tuple[dict[str, Any], list[str]]:
        return selected_item(paths, evt.index)

    def request_of(prompt, width, height, steps, guidance, seed, images=1, dtype=None, offload="none", decode="tiled",
                   cache="none", compile_="none", quantize="none", lora=None, lora_scale=1.0):  # fmt: skip
        # Raw values (the events skip Gradio's preprocessing): each is named when it is not a number; its range is the
        # engine's guard (which names it too).
        numbers = {k: whole_number(k, v) for k, v in
                   {"width": width, "height": height, "steps": steps, "seed": seed, "images": images}.items()}
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
            raise gr.Error(f"guidance must be a number, got {guidance!r}", print_exception=False)
        if lora_scale is not None and (isinstance(lora_scale, bool) or not isinstance(lora_scale, (int, float))):
            raise gr.Error(f"lora_scale must be a number, got {lora_scale!r}", print_exception=False)
        return Request(prompt=prompt or "", guidance=float(guidance), dtype=dtype or studio.default_dtype,
                       offload=offload, vae_decode=decode, cache=cache, compile=compile_, quantize=quantize,
                       lora=None if lora in (None, "", NO_LORA) else lora,
                       lora_scale=1.0 if lora_scale is None else float(lora_scale), **numbers)  # fmt: skip

    @_user_errors
    def run_generate(prompt, width, height, steps, guidance, seed, images, dtype, offload, decode, cache, compile_,
                     quantize, lora, lora_scale, request: gr.Request, progress=gr.Progress()):  # fmt: skip
        req = request_of(prompt, width, height, steps, guidance, seed, images, dtype, offload, decode, cache, compile_,
                         quantize, lora, lora_scale)  # fmt: skip
        made = studio.generate(req, session=request.session_hash or "", since=submissions.since(request),
                               progress=_progress(progress, req.steps, req.images))  # fmt: skip
        _notices(made)
        done = status_line("done", f"{len(made)} image(s) · seed {req.seed} · {req.width}×{req.height}")
        return [(str(g.path), _caption(g.sidecar)) for g in made], [g.sidecar for g in made], done

    @_user_errors
    def api_generate(prompt, width, height, steps, guidance, seed, request: gr.Request, progress=gr.Progress()):
        req = request_of(prompt, width, height, steps, guidance, seed)
        made = studio.generate(req, session=request.session_hash or "", since=submissions.since(request),
                               progress=_progress(progress, req.steps, 1))  # fmt: skip
        _notices(made)
        return str(made[0].path), {**made[0].sidecar, "image_path": str(made[0].path)}

    @_user_errors
    def api_generate_lora(prompt, width, height, steps, guidance, seed, lora, lora_scale, request: gr.Request,
                          progress=gr.Progress()):  # fmt: skip
        req = request_of(prompt, width, height, steps, guidance, seed, lora=lora, lora_scale=lora_scale)
        made = studio.generate(req, session=request.session_hash or "", since=submissions.since(request),
                               progress=_progress(progress, req.steps, 1))  # fmt: skip
        _notices(made)
        return str(made[0].path), {**made[0].sidecar, "image_path": str(made[0].path)}

    @_user_errors
    def run_compare(prompt, width, height, steps, guidance, seed, second, dtype, offload, decode, cache="none",
                    compile_="none", quantize="none", lora=None, lora_scale=1.0, request: gr.Request = None,
                    progress=gr.Progress()):  # fmt: skip
        # ``second`` is this session's dropdown value: checked against the command line's models by the engine,
        # never stored server-side (one user's choice is not another's).
        req = request_of(prompt, width, height, steps, guidance, seed, 1, dtype, offload, decode, cache, compile_,
                         quantize, lora, lora_scale)  # fmt: skip
        pair = studio.compare(req, session=request.session_hash or "", progress=_progress(progress, req.steps, 2),
                              second=second or None, since=submissions.since(request))  # fmt: skip
        (a, meta_a), (b, meta_b) = pair["model"], pair["compare"]
        return str(a.path), str(b.path), _label(meta_a), _label(meta_b), {"model": meta_a, "compare": meta_b}

    def run_compare_page(prompt, width, height, steps, guidance, seed, second, dtype, offload, decode, cache, compile_,
                         quantize, lora, lora_scale, request: gr.Request, progress=gr.Progress()):  # noqa: B008  # fmt: skip
        # Gradio injects the request and progress by signature: spelled out here, not *args
        a, b, label_a, label_b, meta = run_compare(prompt, width, height, steps, guidance, seed, second, dtype,
                                                   offload, decode, cache, compile_, quantize, lora, lora_scale,
                                                   request=request, progress=progress)  # fmt: skip
        return a, b, (a, b), label_a, label_b, meta, status_line("done", "A/B on the same prompt and seed")

    def api_compare(prompt, width, height, steps, guidance, seed, second=None, request: gr.Request = None,
                    progress=gr.Progress()):  # fmt: skip
        a, b, *_, meta = run_compare(prompt, width, height, steps, guidance, seed, second, None, "none", "tiled",
                                     request=request, progress=progress)  # fmt: skip
        return a, b, meta

    def on_size(w, h):
        return size_note(w, h, studio.limits.max_pixels)

    def on_preset(aspect, family):
        if CUSTOM in (aspect, family):  # "custom" keeps the typed size; a preset choice replaces it
            return gr.skip(), gr.skip(), gr.skip()
        w, h = preset_size(aspect, family)
        return w, h, on_size(w, h)

    def on_typed_size(w, h):
        # The aspect and size controls follow a typed size: the preset it is, else "custom" (never a stale value).
        a, f = controls_for(w, h)
        return a, f, on_size(w, h)

    def reuse(sidecar):
        req = request_from_sidecar(sidecar or {}, studio.default_dtype)
        a, f = controls_for(req.width, req.height)
        return (req.prompt, req.width, req.height, req.steps, req.guidance, req.seed, 1, req.dtype, req.offload,
                req.vae_decode, a, f, on_size(req.width, req.height),
                status_line("done", f"settings and seed {req.seed} of the picked image loaded: press Generate"))

    w0, h0 = preset_size("1:1", "1K")
    with gr.Blocks(title="UltraFlux Studio") as demo:
        gr.Markdown(
            f"## UltraFlux Studio\nModel: `{shown(studio.main.label)}`"
            + (f" · compare with `{shown(studio.slot('compare').label)}`" if choices else "")
            + f" · device `{studio.device}` · output `{shown(str(studio.out))}`"
        )
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a red fox in fresh snow, golden hour",
                                    elem_id="prompt")  # fmt: skip
                with gr.Row():
                    aspect = gr.Dropdown([*ASPECTS, CUSTOM], value="1:1", label="Aspect ratio", elem_id="aspect")
                    family = gr.Radio([*FAMILIES, CUSTOM], value="1K", label="Size", elem_id="family")
                with gr.Row():
                    width = gr.Number(w0, label="Width", precision=0, elem_id="width")
                    height = gr.Number(h0, label="Height", precision=0, elem_id="height")
                note = gr.Markdown(on_size(w0, h0), elem_id="size-note")
                with gr.Row():
                    steps = gr.Slider(1, studio.limits.max_steps, value=min(default_steps, studio.limits.max_steps),
                                      step=1, label="Steps", elem_id="steps")  # fmt: skip
                    guidance = gr.Slider(0.0, 10.0, value=4.0, step=0.1, label="Guidance")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
                    randomise = gr.Button("Random seed", size="sm")
                    images = gr.Slider(1, studio.limits.max_images, value=1, step=1, label="Images")
                lora_choices = [NO_LORA] + studio.lora_choices
                with gr.Row(visible=bool(studio.lora_choices)):
                    lora = gr.Dropdown(lora_choices, value=NO_LORA, label="LoRA",
                                       info="an adapter this app was started with (--lora); the main model only",
                                       elem_id="lora")  # fmt: skip
                    lora_scale = gr.Slider(-MAX_LORA_SCALE, MAX_LORA_SCALE, value=1.0, step=0.05, label="LoRA scale",
                                           elem_id="lora-scale")  # fmt: skip
                with gr.Accordion("Advanced settings", open=False):
                    dtype = gr.Radio(["bf16", "fp16", "fp32"], value=studio.default_dtype, label="dtype")
                    offload = gr.Radio(["none", "model", "sequential"], value="none", label="CPU offload (GPU only)")
                    decode = gr.Radio(["tiled", "full", "official"], value="tiled", label="VAE decode")
                    # The accelerators (docs/inference.md); thresholds are the server's generate.accel.
                    cache = gr.Radio(["none", "first_block", "taylorseer"], value="none", label="Step cache")
                    compile_ = gr.Radio(["none", "regional"], value="none", label="torch.compile (first image slow)")
                    quantize = gr.Radio(["none", "fp8"], value="none", label="FP8 weights (GPU 8.9+)")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    cmp_go = gr.Button("Compare", elem_id="compare")
                    stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
                status = gr.Markdown("", elem_id="status")
            with gr.Column(scale=3):
                with gr.Tab("Result"):
                    result = gr.Gallery(label="Result", columns=2, height=520, elem_id="result")
                    result_meta = gr.JSON(label="Sidecar")
                with gr.Tab("Compare"):
                    second = gr.Dropdown(choices, value=choices[0] if choices else None, label="Second model",
                                         info="one of the models this app was started with (--compare)",
                                         # checked by the engine, which refuses any other value without echoing it
                                         allow_custom_value=True,
                                         elem_id="second")  # fmt: skip
                    # A over B with a draggable divider; fullscreen shows the 4K pair at full size, zoom follows.
                    slider = gr.ImageSlider(label="A/B: drag the divider (fullscreen for 4K detail)", type="filepath",
                                            format="png", buttons=["fullscreen", "download"], max_height=720,
                                            elem_id="compare-slider")  # fmt: skip
                    with gr.Row():
                        img_a = gr.Image(label="model", type="filepath", elem_id="compare-a")
                        img_b = gr.Image(label="compare", type="filepath", elem_id="compare-b")
                    with gr.Row():
                        label_a, label_b = gr.Markdown(), gr.Markdown()
                    cmp_meta = gr.JSON(label="Both sidecars")
                with gr.Tab("Gallery"):
                    refresh = gr.Button("Refresh", size="sm")
                    gallery = gr.Gallery(label=f"Everything in {shown(str(studio.out))}, newest first", columns=4,
                                         height=480, elem_id="gallery")  # fmt: skip
                    with gr.Row():
                        picked = gr.JSON(label="Sidecar")
                        reuse_go = gr.Button("Reuse these settings and seed", size="sm", elem_id="reuse")
                        downloads = gr.File(label="Download PNG + JSON", file_count="multiple", elem_id="downloads")
        paths = gr.State([])
        # Hidden outputs of the API endpoints (scripts get the file and the sidecar; the page shows its own).
        with gr.Row(visible=False):
            api_go, api_cmp, api_lora = gr.Button(), gr.Button(), gr.Button()
            api_image, api_image_b, api_meta = gr.Image(type="filepath"), gr.Image(type="filepath"), gr.JSON()

        base = [prompt, width, height, steps, guidance, seed]
        advanced = [dtype, offload, decode, cache, compile_, quantize, lora, lora_scale]
        # preprocess=False: the raw values reach ``request_of`` and the one request guard, whose errors name the
        # setting ("steps must be between 1 and 200 (serve.max_steps), got 0"), instead of Gradio's slider check
        # ("Value 0 is less than minimum value 1.", no name).
        device = {"concurrency_limit": 1, "concurrency_id": DEVICE,
                  "validator": session_limit(demo, session_jobs, submissions), "preprocess": False}  # fmt: skip
        cancelled_by: set[str] = set()  # sessions whose job ended by their Cancel (Gradio reports it as a failure)

        def started(request: gr.Request) -> str:
            cancelled_by.discard(request.session_hash or "")  # a Cancel pressed before this job is not for it
            return status_line("running", "press Cancel to stop at the next step")

        running = {"fn": started, "inputs": None, "outputs": status, "queue": False, "api_visibility": "private"}
        go.click(**running)
        cmp_go.click(**running)
        gen = go.click(run_generate, base + [images] + advanced, [result, result_meta, status],
                       api_visibility="private", show_progress_on=[result], **device)  # fmt: skip
        cmp = cmp_go.click(run_compare_page, base + [second] + advanced,
                           [img_a, img_b, slider, label_a, label_b, cmp_meta, status], api_visibility="private",
                           show_progress_on=[img_a, img_b, slider], **device)  # fmt: skip
        api_go.click(api_generate, base, [api_image, api_meta], api_name="generate", **device)
        api_lora.click(api_generate_lora, base + [lora, lora_scale], [api_image, api_meta], api_name="generate_lora",
                       **device)  # fmt: skip
        api_cmp.click(api_compare, base + [second], [api_image, api_image_b, api_meta], api_name="compare", **device)
        for event in (gen, cmp):
            event.then(refresh_gallery, None, [gallery, paths], queue=False, api_visibility="private")

        cancelled = status_line("cancelled", "stopped at the next step; nothing of the unfinished image was kept")

        def cancel(request: gr.Request) -> str:
            cancelled_by.add(request.session_hash or "")
            studio.cancel(request.session_hash or "")
            return cancelled

        def ended_badly(request: gr.Request) -> str:
            if request.session_hash in cancelled_by:
                cancelled_by.discard(request.session_hash)
                return cancelled
            return status_line("failed", "see the message above")

        # Also an API endpoint: a script stops its own session's job (never another session's).
        stop.click(cancel, None, status, cancels=[gen, cmp], queue=False, api_name="cancel")
        for event in (gen, cmp):  # a failed job says so beside the buttons as well as in its pop-up
            event.failure(ended_badly, None, status, queue=False, api_visibility="private")
        randomise.click(lambda: secrets.randbelow(2**31), None, seed, queue=False, api_visibility="private")
        # .input: the user's own edits only, so a preset filling the size (or the size naming its preset) does not
        # bounce back as another edit.
        for trigger in (aspect.input, family.input):
            trigger(on_preset, [aspect, family], [width, height, note], queue=False, api_visibility="private")
        for trigger in (width.input, height.input):
            trigger(on_typed_size, [width, height], [aspect, family, note], queue=False, api_visibility="private")
        for trigger in (width.change, height.change):
            trigger(on_size, [width, height], note, queue=False, api_visibility="private")
        refresh.click(refresh_gallery, None, [gallery, paths], queue=False, api_visibility="private")
        gallery.select(show_selected, paths, [picked, downloads], queue=False, api_visibility="private")
        filled = [prompt, width, height, steps, guidance, seed, images, dtype, offload, decode, aspect, family, note,
                  status]  # fmt: skip
        reuse_go.click(_user_errors(reuse), picked, filled, queue=False, api_visibility="private")
        demo.load(refresh_gallery, None, [gallery, paths], queue=False, api_visibility="private")
    # max_size: jobs waiting beyond it are refused ("queue is full") instead of piling up without end.
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    return demo


def theme() -> gr.themes.Base:
    """Local system fonts only: the page must not fetch web fonts (offline machines, the browser test)."""
    return gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
