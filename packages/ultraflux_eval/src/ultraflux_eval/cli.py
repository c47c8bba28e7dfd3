"""``ultraflux-eval``: evaluate a directory of images, compare two MLflow runs, verify local weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.options import Options, config_options

from ultraflux_eval.config import BackbonesConfig, BenchmarkConfig
from ultraflux_eval.errors import EvalError
from ultraflux_eval.fid_cli import fid_command
from ultraflux_eval.metrics_cli import fetch_command, metrics_command

app = typer.Typer(
    help="UltraFlux evaluation: per-aspect metrics, MLflow runs, local backbone weights.", no_args_is_help=True
)
weights_app = typer.Typer(
    help="Backbone weights: fetch at pinned revisions, verify sha256, write the manifest.", no_args_is_help=True
)
app.add_typer(weights_app, name="weights")
app.command("fid")(fid_command)
app.command("metrics")(metrics_command)
weights_app.command("fetch")(fetch_command)


@app.command("evaluate")
@config_options(Options("benchmark", BenchmarkConfig, exclude=("prompts_file",)), Options("backbones", BackbonesConfig))
def evaluate_command(
    images: Annotated[Path, typer.Argument(help="directory of images (PNG/JPEG/...), evaluated in name order")],
    prompts: Annotated[Path | None, typer.Option(help="one prompt per line, paired with the images in name order; "
                                                 "default: each image's <stem>.json sidecar `prompt`")] = None,
    out: Annotated[Path, typer.Option(help="report folder")] = Path("artifacts/eval"),
    log: Annotated[bool, typer.Option(help="log one MLflow run (eval.tracking)")] = True,
    *,
    config: list[Path],
    overrides: list[str],
) -> None:
    """Evaluate every image of IMAGES per aspect ratio; write a report and log it to MLflow.

    --config takes params.yaml (its `eval` section) or eval-only YAML files; --set overrides are relative to the
    eval section (benchmark.metrics=[glcm,clip_score]).
    """
    from ultraflux_eval.config import load_eval_config
    from ultraflux_eval.protocol.evaluate import load_image_dir
    from ultraflux_eval.protocol.report import markdown_table
    from ultraflux_eval.protocol.session import run_evaluation

    cfg = load_eval_config(config, overrides)
    paths, texts = load_image_dir(images, prompts)
    run = run_evaluation(paths, texts, cfg, out, params={"images": str(images)}, log=log)
    typer.echo(markdown_table(run.results))
    typer.echo(f"report: {run.report_dir / 'report.md'}")
    if run.run_id:
        typer.echo(f"mlflow run: {run.run_id} ({run.tracking_uri})")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


@app.command("compare")
def compare_command(
    run_a: Annotated[str, typer.Argument(help="MLflow run id A")],
    run_b: Annotated[str, typer.Argument(help="MLflow run id B")],
    tracking_uri: Annotated[
        str | None, typer.Option(metavar="URI", help="default: $MLFLOW_TRACKING_URI, else the demo's store "
                                      "sqlite:///<cwd>/artifacts/mlflow.db")
    ] = None,
) -> None:
    """Side-by-side table of every metric of two evaluation runs (B − A in the last column)."""
    from ultraflux_core.tracking.uri import check_store_exists

    from ultraflux_eval.config import TrackingConfig
    from ultraflux_eval.protocol.logging import compare_runs, reachable_tracking_uri

    uri = TrackingConfig(tracking_uri=tracking_uri).resolve_uri()
    check_store_exists(uri, holds="the runs")  # a lookup never creates an empty store
    uri = reachable_tracking_uri(TrackingConfig(tracking_uri=uri))
    table = Table("metric", f"A {run_a[:8]}", f"B {run_b[:8]}", "B - A")
    for key, a, b in compare_runs(uri, run_a, run_b):
        table.add_row(key, _fmt(a), _fmt(b), _fmt(b - a) if a is not None and b is not None else "-")
    Console(width=160).print(table)


@weights_app.command("verify")
def weights_verify(
    weights_dir: Annotated[Path, typer.Argument(help="folder holding manifest.yaml")] = Path("storage/eval-weights"),
    role: Annotated[list[str] | None, typer.Option(
        metavar="NAME", help="only these backbones (clip, aesthetic_head, pickscore, hps, inception, musiq, hpsv3, "
                             "qalign, artimuse)")] = None,
) -> None:
    """Check every file of the manifest (or of --role) exists with its sha256; exit 2 naming each bad file."""
    from ultraflux_eval.backbones.weights import verify_weights

    files = verify_weights(weights_dir, role or None)
    typer.echo(f"ok  {len(files)} files verified in {weights_dir}")


@weights_app.command("manifest")
def weights_manifest(
    weights_dir: Annotated[Path, typer.Argument(help="folder with the backbone files")],
    backbone: Annotated[list[str] | None, typer.Option(
        metavar="ROLE=PATH", help="ROLE=RELATIVE_PATH, e.g. clip=clip or inception=inception/v3.safetensors")] = None,
) -> None:
    """Hash every file under WEIGHTS_DIR into manifest.yaml and record which path each backbone loads."""
    from ultraflux_eval.backbones.weights import write_manifest

    roles = {}
    for item in backbone or []:
        if "=" not in item:
            raise EvalError(f"--backbone {item!r} must look like ROLE=RELATIVE_PATH")
        name, rel = item.split("=", 1)
        roles[name] = rel
    typer.echo(f"wrote {write_manifest(weights_dir, roles)}")


def main() -> None:
    """Console entry point: ``EvalError`` (any ``UltraFluxError``) becomes a one-line message and exit code 2."""
    try:
        app(standalone_mode=False)
    except UltraFluxError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
