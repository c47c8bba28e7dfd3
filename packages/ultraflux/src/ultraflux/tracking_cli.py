"""``ultraflux tracking``: checks of the MLflow tracking server the flows and clients use."""

from __future__ import annotations

import os

import typer

app = typer.Typer(help="Check the MLflow tracking server.", no_args_is_help=True)


@app.command("check")
def check(
    uri: str | None = typer.Option(None, metavar="URI",
                                   help="tracking URI (default: tracking.uri, then $MLFLOW_TRACKING_URI)"),
    timeout_s: float = typer.Option(5.0, help="TCP connect timeout before the artifact probe"),
) -> None:
    """Readiness: write, read back and delete a tiny artifact through the server (proves the artifact store is
    writable, which /health does not); exit 2 with the failing step and the server's answer."""
    from ultraflux_core.errors import UltraFluxError
    from ultraflux_core.tracking.readiness import check_artifact_store

    from ultraflux.config import resolve_config

    target = uri or resolve_config().tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not target:
        raise UltraFluxError("no tracking server to check: pass --uri, set tracking.uri or $MLFLOW_TRACKING_URI")
    typer.echo(f"ok  {target}: artifact store writable ({check_artifact_store(target, timeout_s)})")
