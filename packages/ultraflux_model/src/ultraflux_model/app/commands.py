"""``ultraflux ui``: start UltraFlux Studio on one machine (loopback by default, no share link unless asked)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from ultraflux_model.config import config_from_dict, resolve_config
from ultraflux_model.errors import UltraFluxError


def ui(
    model: str | None = typer.Option(None, help="checkpoint directory, hub id or models:/NAME@ALIAS (ui.model)"),
    compare: str | None = typer.Option(None, help="second model shown side by side on the same prompt and seed"),
    transformer: str | None = typer.Option(None, help="transformer from another source (directory or hub id)"),
    host: str | None = typer.Option(None, help="bind address (default 127.0.0.1)"),
    port: int | None = typer.Option(None, help="port (default 7860; 0: the first free one from 7860)"),
    out: Path | None = typer.Option(None, help="where images and sidecars go; the gallery shows this folder"),
    share: bool | None = typer.Option(None, "--share/--no-share", help="public gradio.live link (off by default)"),
    steps: int | None = typer.Option(None, help="default sampling steps in the form"),
    config: list[Path] = typer.Option([], "--config", "-c", help="YAML files layered in order"),
    set_: list[str] = typer.Option([], "--set", help="section.key=value overrides (e.g. serve.max_images=2)"),
) -> None:
    """Start the web app: generate at any aspect ratio, watch progress, browse the gallery, compare two models."""
    resolved = resolve_config(config, set_)
    flags = {"model": model, "compare": compare, "transformer": transformer, "host": host, "port": port,
             "out": out, "share": share, "steps": steps}  # fmt: skip
    cfg = config_from_dict(
        {**resolved.model_dump(), "ui": {**resolved.ui.model_dump(), **{k: v for k, v in flags.items() if v is not None}}},
        source="ui options",
    )
    # Gradio phones home for analytics and version checks unless told not to; read when gradio is imported.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ultraflux_model.app.engine import Studio

    try:
        from ultraflux_model.app.studio import CSS, build_app, theme
    except ModuleNotFoundError as err:
        raise UltraFluxError(f"the web app needs gradio ({err}): pip install 'ultraflux-model[app]'") from err

    studio = Studio(cfg.ui.model, out=cfg.ui.out, limits=cfg.serve, compare=cfg.ui.compare,
                    transformer=cfg.ui.transformer)  # fmt: skip
    # Load once, before serving: a missing or broken model fails here with one line, not on the first request.
    for side in studio.slots:
        typer.echo(f"loaded {side}: {studio.load(side).label}")
    demo = build_app(studio, default_steps=cfg.ui.steps)
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=cfg.ui.host,
        server_port=cfg.ui.port or None,
        share=cfg.ui.share,
        allowed_paths=[str(Path(cfg.ui.out).resolve())],
        show_error=True,
        ssr_mode=False,
        theme=theme(),
        css=CSS,
    )
