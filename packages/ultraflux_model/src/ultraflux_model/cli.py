"""``ultraflux`` command line: thin typer commands over the library, reading the one config tree."""

from __future__ import annotations

from pathlib import Path

import typer

from ultraflux_model.config import UltraFluxConfig, dump_config, load_config
from ultraflux_model.errors import UltraFluxError

app = typer.Typer(help="UltraFlux: native-4K text-to-image generation, data, training.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect and validate the config tree (params.yaml + presets).", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("dump")
def config_dump(
    config: list[Path] = typer.Option([], "--config", "-c", help="YAML files layered in order"),
    set_: list[str] = typer.Option([], "--set", help="section.key=value overrides"),
    out: Path | None = typer.Option(None, help="write here instead of stdout"),
) -> None:
    """Print the resolved config (defaults when no file is given) as params.yaml-style YAML."""
    resolved = load_config(*config, overrides=set_) if config or set_ else UltraFluxConfig()
    text = dump_config(resolved)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)


@config_app.command("validate")
def config_validate(paths: list[Path]) -> None:
    """Validate each YAML file layered over nothing (exit 1 with every bad field listed)."""
    for path in paths:
        load_config(path)
        typer.echo(f"ok  {path}")


def main() -> None:
    """Entry point that turns ``UltraFluxError`` into a one-line message and exit code 2."""
    try:
        app(standalone_mode=False)
    except UltraFluxError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
