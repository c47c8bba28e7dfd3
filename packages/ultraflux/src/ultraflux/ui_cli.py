"""``ultraflux ui``: start UltraFlux Studio on one machine (loopback by default, no share link unless asked)."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.options import Options, config_options, override_value
from ultraflux_model.config import UiConfig

from ultraflux.config import resolve_config


@config_options(Options("ui", UiConfig, exclude=("lora",)))
def ui(
    lora: list[str] = typer.Option([], "--lora", metavar="DIR",
                                   help="a LoRA adapter folder the picker offers; repeat (ui.lora)"),
    *,
    config: list[Path],
    overrides: list[str],
) -> None:
    """Start the web app: generate at any aspect ratio, watch progress, browse the gallery, compare two models.

    --model and --compare take a checkpoint directory, a hub id or a registry URI (models:/NAME@ALIAS).
    """
    if lora:
        overrides.append(f"ui.lora={override_value(list(lora))}")
    cfg = resolve_config(config, overrides)
    # Gradio phones home for analytics and version checks unless told not to; read when gradio is imported.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ultraflux_model.app.engine import Studio

    try:
        from ultraflux_model.app.studio import CSS, build_app, theme
    except ModuleNotFoundError as err:
        raise UltraFluxError(f"the web app needs gradio ({err}): pip install 'ultraflux-model[app]'") from err

    studio = Studio(cfg.ui.model, out=cfg.ui.out, limits=cfg.serve, compare=cfg.ui.compare,
                    transformer=cfg.ui.transformer, lora=cfg.ui.lora)  # fmt: skip
    # Resolve every model first (a typo fails in seconds, before any weights load), then load once, before
    # serving: a missing or broken model fails here with one line, not on the first request.
    studio.resolve_models(every=True)
    for side, slot in studio.slots():
        typer.echo(f"loaded {side}: {studio.load(side, second=slot.ref if side == 'compare' else None).label}")
    demo = build_app(studio, default_steps=cfg.ui.steps, queue_size=cfg.ui.queue_size, session_jobs=cfg.ui.session_jobs)
    demo.launch(
        server_name=cfg.ui.host,
        server_port=cfg.ui.port or None,
        share=cfg.ui.share,
        allowed_paths=[str(Path(cfg.ui.out).resolve())],
        show_error=True,
        ssr_mode=False,
        theme=theme(),
        css=CSS,
        quiet=True,  # Gradio's own banner tells users to edit launch(); ours names the flag
        prevent_thread_lock=True,
    )
    typer.echo(launch_banner(demo.local_url, demo.share_url))
    demo.block_thread()


def launch_banner(local_url: str | None, share_url: str | None) -> str:
    """What ``ultraflux ui`` prints once the page is up: where to open it, and how to share it."""
    lines = [f"UltraFlux Studio: open {local_url}"]
    if share_url:
        lines.append(f"public link (temporary): {share_url}")
    else:
        lines.append("to get a public link, start it again with `ultraflux ui --share`")
    return "\n".join(lines)
