"""``ultraflux`` command line: thin typer commands over the library, reading the one config tree."""

from __future__ import annotations

from pathlib import Path

import typer

from ultraflux_model.config import (
    Dtype,
    Offload,
    VaeDecodeMode,
    config_from_dict,
    dump_config,
    load_config,
    resolve_config,
)
from ultraflux_model.app.commands import ui
from ultraflux_model.convert import convert_app
from ultraflux_model.data.commands import app as data_app
from ultraflux_model.errors import UltraFluxError
from ultraflux_model.training.commands import train_app
from ultraflux_model.training.plan_command import plan_command

app = typer.Typer(
    help="UltraFlux: native-4K text-to-image generation, data, training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect and validate the config tree (params.yaml + presets).", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")  # ultraflux_model/data/commands.py
app.add_typer(train_app)  # train, vae-train (ultraflux_model/training/commands.py)
app.command("ui")(ui)  # the web app (ultraflux_model/app/commands.py)
app.command("plan")(plan_command)  # ultraflux_model/training/plan_command.py
app.add_typer(convert_app, name="convert")  # flux-dev, assemble (ultraflux_model/convert.py)


@config_app.command("dump")
def config_dump(
    config: list[Path] = typer.Option([], "--config", "-c", help="YAML files layered in order"),
    set_: list[str] = typer.Option([], "--set", help="section.key=value overrides"),
    out: Path | None = typer.Option(None, help="write here instead of stdout"),
) -> None:
    """Print the resolved config (defaults when no file is given) as params.yaml-style YAML."""
    text = dump_config(resolve_config(config, set_))
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)  # a DVC stage's out: its folder may not exist yet
        out.write_text(text)


@config_app.command("validate")
def config_validate(paths: list[Path]) -> None:
    """Validate each YAML file layered over nothing (exit 1 with every bad field listed)."""
    for path in paths:
        load_config(path)
        typer.echo(f"ok  {path}")


@app.command("init-tiny")
def init_tiny(
    directory: Path = typer.Argument(..., help="where to write the checkpoint"),
    seed: int = 0,
    width_preset: str = typer.Option("tiny", help="transformer widths: tiny | flux-dev (3072 hidden, 24 heads)"),
    layers: int | None = typer.Option(None, help="double-stream blocks (default: the preset's; flux-dev 19)"),
    single_layers: int | None = typer.Option(None, help="single-stream blocks (default: the preset's; flux-dev 38)"),
    dtype: Dtype = typer.Option("fp32", help="transformer weights on disk: fp32 | bf16 | fp16"),
) -> None:
    """Write a complete checkpoint in the official layout (random weights, offline tokenizers).

    Default: the tiny test model. ``--width-preset flux-dev --layers 1 --single-layers 1``: a real-width
    transformer with few blocks (written layer by layer into safetensors shards) for real-scale checks on CPU.
    """
    import torch

    from ultraflux_model.tiny import write_tiny_checkpoint

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    path = write_tiny_checkpoint(directory, seed=seed, width_preset=width_preset,  # type: ignore[arg-type]
                                 layers=layers, single_layers=single_layers, dtype=torch_dtype)
    typer.echo(f"wrote {path}")


@app.command()
def generate(
    model: str | None = typer.Option(None, help="checkpoint directory or hub id (generate.model)"),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="a prompt; repeat for several"),
    prompts_file: Path | None = typer.Option(None, help="text file, one prompt per line"),
    width: int | None = typer.Option(None, help="pixels, multiple of 32"),
    height: int | None = typer.Option(None, help="pixels, multiple of 32"),
    steps: int | None = typer.Option(None, help="sampling steps (default 50)"),
    guidance: float | None = typer.Option(None, help="distilled guidance (default 4)"),
    seed: int | None = typer.Option(None, help="seed of the first image; image k uses seed+k"),
    dtype: Dtype | None = typer.Option(None, help="bf16 | fp16 | fp32"),
    offload: Offload | None = typer.Option(None, help="none | model | sequential"),
    vae_decode: VaeDecodeMode | None = typer.Option(None, help="tiled | full | official"),
    out: Path | None = typer.Option(None, help="output directory"),
    transformer: str | None = typer.Option(None, help="transformer from another source: directory or hub id"),
    config: list[Path] = typer.Option([], "--config", "-c", help="YAML files layered in order"),
    set_: list[str] = typer.Option([], "--set", help="section.key=value overrides"),
) -> None:
    """Generate images; each PNG gets a JSON sidecar (prompt, seed, size, model hash, timings, peak memory)."""
    from ultraflux_model.inference.pipeline import generate_from_config

    prompts = list(prompt)
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise UltraFluxError(f"prompts file {prompts_file} does not exist")
        prompts += [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
    resolved = resolve_config(config, set_)
    base = resolved.generate.model_dump()
    flags = {
        "model": model, "steps": steps, "guidance": guidance, "seed": seed, "dtype": dtype, "offload": offload,
        "vae_decode": vae_decode, "out": out, "prompts": tuple(prompts) or None, "transformer": transformer,
    }
    if (width is None) != (height is None):
        raise UltraFluxError("give both --width and --height (or neither, to use generate.sizes)")
    if width is not None:
        flags["sizes"] = ((width, height),)
    cfg = config_from_dict(
        {"generate": {**base, **{k: v for k, v in flags.items() if v is not None}}}, source="generate options"
    )
    for image in generate_from_config(cfg.generate, rope_kernel=resolved.kernels.rope):
        typer.echo(f"{image.path}  ({image.width}x{image.height}, seed {image.seed})")


def main() -> None:
    """Entry point that turns ``UltraFluxError`` into a one-line message and exit code 2."""
    from ultraflux_model.console import run

    run(app)
