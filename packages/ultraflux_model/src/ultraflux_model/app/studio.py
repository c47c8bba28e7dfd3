"""UltraFlux Studio: the Gradio page over :class:`~ultraflux_model.app.engine.Studio`.

Left: the prompt and settings. Right: the result with its sidecar, the side-by-side comparison of two models,
and the gallery of everything in ``--out``. API endpoints for scripts: ``/generate`` (prompt, width, height, steps,
guidance, seed → image file, metadata JSON), ``/compare`` (same inputs, plus optionally the second model, one of the
app's ``--compare`` models → two images and both sides' metadata) and ``/cancel`` (stops the caller's own running job
at its next step). Every generation event shares one concurrency slot: one job on the device at a time. The queue
holds at most ``queue_size`` waiting jobs and one session at most ``session_jobs`` (checked when a job is submitted,
so one client cannot fill the queue); errors shown to clients are one line with no server path.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from ultraflux_model.app.engine import Request, Studio, friendly_error, hide_paths, list_outputs, read_sidecar
from ultraflux_model.app.sizes import ASPECTS, FAMILIES, preset_size, size_note
from ultraflux_model.config import MAX_LORA_SCALE
from ultraflux_model.inference.pipeline import StepCallback

DEVICE = "device"  # the concurrency id every event that runs a model shares
CSS = "#size-note p {margin: 0} footer {display: none !important}"
NO_LORA = "none"  # the LoRA picker's first entry


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


def session_limit(demo: gr.Blocks, session_jobs: int) -> Callable[..., Any]:
    """A Gradio validator that refuses a job while its session already has ``session_jobs`` jobs queued or running.

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


def _caption(sidecar: dict[str, Any]) -> str:
    return f"{sidecar.get('width')}×{sidecar.get('height')} · seed {sidecar.get('seed')} · {sidecar.get('prompt', '')[:60]}"


def _label(sidecar: dict[str, Any]) -> str:
    return (
        f"**{sidecar.get('side', '')}** `{sidecar.get('model')}` · sha256 `{str(sidecar.get('model_hash', ''))[:12]}`  \n"
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

    def refresh_gallery() -> tuple[list[tuple[str, str]], list[str]]:
        return gallery_items(studio.out)

    def show_selected(paths: list[str], evt: gr.SelectData) -> tuple[dict[str, Any], list[str]]:
        return selected_item(paths, evt.index)

    def request_of(prompt, width, height, steps, guidance, seed, images=1, dtype=None, offload="none", decode="tiled",
                   cache="none", compile_="none", quantize="none", lora=None, lora_scale=1.0):  # fmt: skip
        if width is None or height is None or seed is None:
            raise gr.Error("width, height and seed must be numbers", print_exception=False)
        return Request(
            prompt=prompt or "", width=int(width), height=int(height), steps=int(steps), guidance=float(guidance),
            seed=int(seed), images=int(images), dtype=dtype or studio.default_dtype, offload=offload, vae_decode=decode,
            cache=cache, compile=compile_, quantize=quantize,
            lora=None if lora in (None, "", NO_LORA) else lora, lora_scale=1.0 if lora_scale is None else lora_scale,
        )  # fmt: skip

    @_user_errors
    def run_generate(prompt, width, height, steps, guidance, seed, images, dtype, offload, decode, cache, compile_,
                     quantize, lora, lora_scale, request: gr.Request, progress=gr.Progress()):  # fmt: skip
        req = request_of(prompt, width, height, steps, guidance, seed, images, dtype, offload, decode, cache, compile_,
                         quantize, lora, lora_scale)  # fmt: skip
        made = studio.generate(req, session=request.session_hash or "", progress=_progress(progress, req.steps, req.images))
        _notices(made)
        return [(str(g.path), _caption(g.sidecar)) for g in made], [g.sidecar for g in made]

    @_user_errors
    def api_generate(prompt, width, height, steps, guidance, seed, request: gr.Request, progress=gr.Progress()):
        req = request_of(prompt, width, height, steps, guidance, seed)
        made = studio.generate(req, session=request.session_hash or "", progress=_progress(progress, req.steps, 1))
        _notices(made)
        return str(made[0].path), {**made[0].sidecar, "image_path": str(made[0].path)}

    @_user_errors
    def api_generate_lora(prompt, width, height, steps, guidance, seed, lora, lora_scale, request: gr.Request,
                          progress=gr.Progress()):  # fmt: skip
        req = request_of(prompt, width, height, steps, guidance, seed, lora=lora, lora_scale=lora_scale)
        made = studio.generate(req, session=request.session_hash or "", progress=_progress(progress, req.steps, 1))
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
                              second=second or None)  # fmt: skip
        (a, meta_a), (b, meta_b) = pair["model"], pair["compare"]
        return str(a.path), str(b.path), _label(meta_a), _label(meta_b), {"model": meta_a, "compare": meta_b}

    def api_compare(prompt, width, height, steps, guidance, seed, second=None, request: gr.Request = None,
                    progress=gr.Progress()):  # fmt: skip
        a, b, _, _, meta = run_compare(prompt, width, height, steps, guidance, seed, second, None, "none", "tiled",
                                       request=request, progress=progress)  # fmt: skip
        return a, b, meta

    def on_size(w, h):
        return size_note(w, h, studio.limits.max_pixels)

    def on_preset(aspect, family):
        w, h = preset_size(aspect, family)
        return w, h, on_size(w, h)

    w0, h0 = preset_size("1:1", "1K")
    with gr.Blocks(title="UltraFlux Studio") as demo:
        gr.Markdown(
            f"## UltraFlux Studio\nModel: `{studio.main.label}`"
            + (f" · compare with `{studio.slot('compare').label}`" if choices else "")
            + f" · device `{studio.device}` · output `{studio.out}`"
        )
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a red fox in fresh snow, golden hour",
                                    elem_id="prompt")  # fmt: skip
                with gr.Row():
                    aspect = gr.Dropdown(list(ASPECTS), value="1:1", label="Aspect ratio", elem_id="aspect")
                    family = gr.Radio(list(FAMILIES), value="1K", label="Size", elem_id="family")
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
                    with gr.Row():
                        img_a = gr.Image(label="model", type="filepath", elem_id="compare-a")
                        img_b = gr.Image(label="compare", type="filepath", elem_id="compare-b")
                    with gr.Row():
                        label_a, label_b = gr.Markdown(), gr.Markdown()
                    cmp_meta = gr.JSON(label="Both sidecars")
                with gr.Tab("Gallery"):
                    refresh = gr.Button("Refresh", size="sm")
                    gallery = gr.Gallery(label=f"Everything in {studio.out}, newest first", columns=4, height=480,
                                         elem_id="gallery")  # fmt: skip
                    with gr.Row():
                        picked = gr.JSON(label="Sidecar")
                        downloads = gr.File(label="Download PNG + JSON", file_count="multiple", elem_id="downloads")
        paths = gr.State([])
        # Hidden outputs of the API endpoints (scripts get the file and the sidecar; the page shows its own).
        with gr.Row(visible=False):
            api_go, api_cmp, api_lora = gr.Button(), gr.Button(), gr.Button()
            api_image, api_image_b, api_meta = gr.Image(type="filepath"), gr.Image(type="filepath"), gr.JSON()

        base = [prompt, width, height, steps, guidance, seed]
        advanced = [dtype, offload, decode, cache, compile_, quantize, lora, lora_scale]
        device = {"concurrency_limit": 1, "concurrency_id": DEVICE, "validator": session_limit(demo, session_jobs)}
        gen = go.click(run_generate, base + [images] + advanced, [result, result_meta], api_visibility="private",
                       **device)  # fmt: skip
        cmp = cmp_go.click(run_compare, base + [second] + advanced, [img_a, img_b, label_a, label_b, cmp_meta],
                           api_visibility="private", **device)  # fmt: skip
        api_go.click(api_generate, base, [api_image, api_meta], api_name="generate", **device)
        api_lora.click(api_generate_lora, base + [lora, lora_scale], [api_image, api_meta], api_name="generate_lora",
                       **device)  # fmt: skip
        api_cmp.click(api_compare, base + [second], [api_image, api_image_b, api_meta], api_name="compare", **device)
        for event in (gen, cmp):
            event.then(refresh_gallery, None, [gallery, paths], queue=False, api_visibility="private")

        def cancel(request: gr.Request) -> None:
            studio.cancel(request.session_hash or "")

        # Also an API endpoint: a script stops its own session's job (never another session's).
        stop.click(cancel, None, None, cancels=[gen, cmp], queue=False, api_name="cancel")
        randomise.click(lambda: secrets.randbelow(2**31), None, seed, queue=False, api_visibility="private")
        for trigger in (aspect.change, family.change):
            trigger(on_preset, [aspect, family], [width, height, note], queue=False, api_visibility="private")
        for trigger in (width.change, height.change):
            trigger(on_size, [width, height], note, queue=False, api_visibility="private")
        refresh.click(refresh_gallery, None, [gallery, paths], queue=False, api_visibility="private")
        gallery.select(show_selected, paths, [picked, downloads], queue=False, api_visibility="private")
        demo.load(refresh_gallery, None, [gallery, paths], queue=False, api_visibility="private")
    # max_size: jobs waiting beyond it are refused ("queue is full") instead of piling up without end.
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    return demo


def theme() -> gr.themes.Base:
    """Local system fonts only: the page must not fetch web fonts (offline machines, the browser test)."""
    return gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
