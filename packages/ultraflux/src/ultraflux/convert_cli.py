"""``ultraflux convert``: the commands over ``ultraflux_model.checkpoint.convert`` (flux-dev, assemble)."""

from __future__ import annotations

from pathlib import Path

import typer
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.checkpoint.convert import convert_flux_dev
from ultraflux_model.checkpoint.layout import assemble_checkpoint
from ultraflux_model.checkpoint.resolve import resolve_checkpoint

convert_app = typer.Typer(help="Write UltraFlux-layout checkpoints (from FLUX.1-dev, or assembled).",
                          no_args_is_help=True)


@convert_app.command("flux-dev")
def flux_dev_command(
    src: str = typer.Argument(..., help="diffusers FLUX.1-dev checkpoint: a directory or a hub id"),
    dst: Path = typer.Argument(..., help="new directory for the UltraFlux-layout checkpoint"),
    vae: str = typer.Option("f16-init", metavar="f16-init|DIR",
                            help="'f16-init' (FLUX.1-dev VAE weights, stride 2) or an F16 VAE dir"),
) -> None:
    """FLUX.1-dev → UltraFlux layout (transformer unchanged + YaRN keys, F16 VAE start, encoders copied)."""
    out = convert_flux_dev(src, dst, vae=vae)
    typer.echo(f"wrote {out}")
    if vae == "f16-init":
        typer.echo("next: `ultraflux vae-train` post-trains the F16 decoder (the encoder and its latents stay)")


@convert_app.command("assemble")
def assemble_command(
    base: str = typer.Argument(..., help="complete checkpoint (dir or hub id), e.g. Owen777/UltraFlux-v1"),
    dst: Path = typer.Argument(..., help="new directory"),
    transformer: str | None = typer.Option(
        None, metavar="DIR|HUB-ID", help="transformer dir or hub id, e.g. Owen777/UltraFlux-v1-1-Transformer"
    ),
    vae: str | None = typer.Option(None, metavar="DIR|HUB-ID", help="vae dir or hub id"),
) -> None:
    """A complete checkpoint: BASE with its transformer and/or VAE replaced (files hard-linked)."""
    if transformer is None and vae is None:
        raise UltraFluxError("give --transformer and/or --vae: otherwise BASE is already the checkpoint")
    replace = {name: resolve_checkpoint(value) for name, value in (("transformer", transformer), ("vae", vae)) if value}
    typer.echo(f"wrote {assemble_checkpoint(base, dst, replace)}")
