"""``ultraflux`` command line: the composition of every package's commands over the one config tree.

Commands are thin: options are generated from the config fields (``ultraflux_core.options``), resolved with the
one loader (``ultraflux.config``) and handed to library functions. Library imports happen inside the commands so
``ultraflux --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer
from ultraflux_core.config import dump_config
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.options import CONFIG_METAVAR, SET_METAVAR, Options, config_options, override_value
from ultraflux_model.config import AccelConfig, Dtype, GenerateConfig

from ultraflux.config import load_config, resolve_config
from ultraflux.convert_cli import convert_app
from ultraflux.data_cli import app as data_app
from ultraflux.lora_cli import app as lora_app
from ultraflux.plan_cli import plan_command
from ultraflux.serve_cli import serve
from ultraflux.tracking_cli import app as tracking_app
from ultraflux.train_cli import train_app
from ultraflux.ui_cli import ui
from ultraflux.worker_cli import app as worker_app

app = typer.Typer(
    help="UltraFlux: native-4K text-to-image generation, data, training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"ultraflux {version('ultraflux')}")
        except PackageNotFoundError:  # run from a checkout that was not pip-installed
            typer.echo("ultraflux (not installed: run from a source checkout)")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="print the version and exit"),
) -> None:
    """UltraFlux: native-4K text-to-image generation, data, training."""


config_app = typer.Typer(help="Inspect and validate the config tree (params.yaml + presets).", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")  # ultraflux/data_cli.py
app.add_typer(train_app)  # train, vae-train (ultraflux/train_cli.py)
app.command("ui")(ui)  # the web app (ultraflux/ui_cli.py)
app.command("serve")(serve)  # Ray Serve (ultraflux/serve_cli.py)
app.command("plan")(plan_command)  # ultraflux/plan_cli.py
app.add_typer(convert_app, name="convert")  # flux-dev, assemble (ultraflux/convert_cli.py)
app.add_typer(tracking_app, name="tracking")  # check (ultraflux/tracking_cli.py)
app.add_typer(worker_app, name="worker")  # start: the draining process worker (ultraflux/worker_cli.py)
app.add_typer(lora_app, name="lora")  # export (ultraflux/lora_cli.py)


@config_app.command("dump")
def config_dump(
    config: list[Path] = typer.Option([], "--config", "-c", metavar=CONFIG_METAVAR, help="YAML files layered in order"),
    set_: list[str] = typer.Option([], "--set", metavar=SET_METAVAR, help="section.key=value overrides"),
    out: Path | None = typer.Option(None, metavar="FILE", help="write here instead of stdout"),
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
    width_preset: str = typer.Option("tiny", metavar="tiny|flux-dev",
                                     help="transformer widths: tiny | flux-dev (3072 hidden, 24 heads)"),
    layers: int | None = typer.Option(None, metavar="INTEGER",
                                      help="double-stream blocks (default: the preset's; flux-dev 19)"),
    single_layers: int | None = typer.Option(None, metavar="INTEGER",
                                             help="single-stream blocks (default: the preset's; flux-dev 38)"),
    dtype: Dtype = typer.Option("fp32", help="transformer weights on disk: fp32 | bf16 | fp16"),
) -> None:
    """Write a complete checkpoint in the official layout (random weights, offline tokenizers).

    Default: the tiny test model. With --width-preset flux-dev --layers 1 --single-layers 1: a real-width
    transformer with few blocks (written layer by layer into safetensors shards) for real-scale checks on CPU.
    """
    from ultraflux_model.checkpoint.tiny import write_tiny_checkpoint
    from ultraflux_model.dtypes import TORCH_DTYPES

    path = write_tiny_checkpoint(directory, seed=seed, width_preset=width_preset,  # type: ignore[arg-type]
                                 layers=layers, single_layers=single_layers, dtype=TORCH_DTYPES[dtype])
    typer.echo(f"wrote {path}")


@app.command()
@config_options(Options("generate", GenerateConfig, exclude=("prompts", "sizes", "lora")),
                Options("generate.accel", AccelConfig))
def generate(
    prompt: list[str] = typer.Option([], "--prompt", "-p", metavar="TEXT",
                                     help="a prompt; repeat for several (generate.prompts)"),
    prompts_file: Path | None = typer.Option(None, metavar="FILE",
                                             help="text file, one prompt per line (generate.prompts)"),
    width: int | None = typer.Option(None, metavar="PIXELS", help="multiple of 32 (generate.sizes)"),
    height: int | None = typer.Option(None, metavar="PIXELS", help="multiple of 32 (generate.sizes)"),
    overwrite: bool = typer.Option(False, help="write into --out itself, replacing images of the same name, "
                                   "instead of a new run folder under it"),
    lora: list[str] = typer.Option(
        [], "--lora", metavar="PATH[:SCALE]", help="a LoRA adapter folder, scale 1 by default; repeat for several "
        "(generate.lora)"
    ),
    *,
    config: list[Path],
    overrides: list[str],
) -> None:
    """Generate images; each PNG gets a JSON sidecar (prompt, seed, size, model hash, timings, peak memory).

    --model takes a checkpoint directory, a hub id or a registry URI: models:/NAME@ALIAS (models:/ultraflux@champion),
    models:/NAME/VERSION, looked up at $MLFLOW_TRACKING_URI, else the demo's store artifacts/mlflow.db. Image k uses
    seed+k. Each run writes into a new folder under --out (printed at the end) unless --overwrite. Prompts, sizes,
    steps, guidance and seeds pass the same checks as the web app's, before anything is loaded.
    --lora adds adapters trained on that model (docs/lora.md); --fuse-lora merges them into the weights first.
    --cache/--compile/--quantize/--parallel pick the accelerators (docs/inference.md); --parallel context runs under
    'torchrun --nproc-per-node N -m ultraflux.cli generate …' and rank 0 writes the images.
    """
    from ultraflux_model.inference.limits import check_prompts, check_settings, check_sizes
    from ultraflux_model.inference.pipeline import generate_from_config
    from ultraflux_model.inference.runs import new_run_dir

    prompts = list(prompt)
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise UltraFluxError(f"prompts file {prompts_file} does not exist")
        prompts += [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise UltraFluxError(f"prompts file {prompts_file} holds no prompt (one per line)")
    if (width is None) != (height is None):
        raise UltraFluxError("give both --width and --height (or neither, to use generate.sizes)")
    if prompts:
        overrides.append(f"generate.prompts={override_value(prompts)}")
    if width is not None:
        overrides.append(f"generate.sizes={override_value([[width, height]])}")
    if lora:
        overrides.append(f"generate.lora={override_value(list(lora))}")
    cfg = resolve_config(config, overrides)
    gen = cfg.generate
    # The web app's request guard, before the model loads (generate() repeats it for library callers); the image
    # count is a server's per-request ceiling and does not bound a batch run.
    check_prompts(list(gen.prompts))
    check_sizes(cfg.serve, [tuple(s) for s in gen.sizes])
    check_settings(cfg.serve, steps=gen.steps, guidance=gen.guidance, seed=gen.seed, shift=gen.shift,
                   images=len(gen.prompts) * len(gen.sizes))  # fmt: skip
    out = gen.out if overwrite else new_run_dir(gen.out)
    images = generate_from_config(gen, rope_kernel=cfg.kernels.rope, limits=cfg.serve, out_dir=out)
    for image in images:
        typer.echo(f"{image.path}  ({image.width}x{image.height}, seed {image.seed})")
    typer.echo(f"{len(images)} image(s) in {out}")


def main() -> None:
    """Entry point that turns ``UltraFluxError`` into a one-line message and exit code 2."""
    from ultraflux_core.console import run

    run(app)


if __name__ == "__main__":  # python -m ultraflux.cli: a subprocess without the console script, torchrun -m …
    main()
