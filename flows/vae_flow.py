"""VAE decoder post-training flow: train, then publish the before/after reconstruction table.

    python -m flows.vae_flow --config configs/tiny.yaml [--set vae_train.steps=100]
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from ultraflux.config import UltraFluxConfig, resolve_config
from ultraflux.deploy import SharedRoots, with_roots
from ultraflux_data.vae_post import VaeReport, post_train_vae


@task(name="post-train-vae-decoder")
def post_train(cfg: UltraFluxConfig) -> VaeReport:
    return post_train_vae(cfg.vae_train, cfg.tracking)


@flow(name="ultraflux-vae-post-training", log_prints=True)
def vae_flow(config: list[str] | None = None, overrides: list[str] | None = None,
             roots: SharedRoots | None = None) -> dict[str, Any]:
    """``roots`` moves ``artifacts/…`` inputs and outputs onto shared folders (deployments)."""
    cfg = resolve_config(config, with_roots(config, overrides, roots))
    report = post_train(cfg)
    create_markdown_artifact(key="vae-post-training", markdown=f"### VAE decoder post-training\n\n{report.table()}"
                             f"\nstart: `{report.start_vae}`, export: `{report.export}`\n")
    return {"before": report.before, "after": report.after, "export": str(report.export), "table": report.table()}


if __name__ == "__main__":
    import typer

    def main(config: list[str] = typer.Option([]), set_: list[str] = typer.Option([], "--set")) -> None:
        print(vae_flow(config=config, overrides=set_))

    typer.run(main)
