"""``ultraflux-eval metrics`` (the metric registry with local weights' presence) and
``ultraflux-eval weights fetch`` (pinned downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def metrics_command(
    weights_dir: Annotated[Path, typer.Option(help="folder with manifest.yaml")] = Path("storage/eval-weights"),
) -> None:
    """List every metric: kind, backbone, scale, pip extra, paper value, weights present, comparability."""
    from rich.console import Console
    from rich.table import Table

    from ultraflux_eval.backbones.weights import weights_status
    from ultraflux_eval.metrics.table import METRICS

    table = Table("metric", "kind", "backbone", "scale", "extra", "paper@4096", "weights", "comparable")
    for info in METRICS.values():
        table.add_row(info.name, info.kind, info.backbone, info.scale, info.extra or "-",
                      "-" if info.paper_4096 is None else f"{info.paper_4096:g}",
                      weights_status(info.roles, weights_dir),
                      info.comparable + "".join(f" [{k}={v}]" for k, v in info.protocol))
    Console(width=220).print(table)


def fetch_command(
    only: Annotated[list[str] | None, typer.Option(
        metavar="METRIC", help="only the backbones of these metrics (repeatable)")] = None,
    dir_: Annotated[Path, typer.Option("--dir", help="weights folder (manifest.yaml is written there)")] = Path(
        "storage/eval-weights"),
    source: Annotated[Path | None, typer.Option(
        help="a local folder laid out like the hubs (hf/<repo>/<revision>/<file>, url/<file>) instead of the "
             "network")] = None,
    allow_unpinned: Annotated[bool, typer.Option(
        help="also fetch repos without a pinned commit (records the resolved commit)")] = False,
) -> None:
    """Download each backbone at its pinned revision, verify sha256, write the manifest; refuses offline."""
    from ultraflux_eval.backbones.weights import LocalHub, fetch_weights

    hub = LocalHub(source) if source is not None else None
    path = fetch_weights(dir_, only or None, hub=hub, allow_unpinned=allow_unpinned)
    typer.echo(f"wrote {path}")
