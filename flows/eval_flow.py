"""Evaluation flow: generate → evaluate → log → maybe promote.

Thin: every task is one library call. Images come from our generator — ``model=...`` (a local checkpoint or hub
id: evaluated, logged as a content-addressed pyfunc release, registered) or ``model_uri=...`` (a registry URI
such as ``models:/ultraflux@champion`` or ``models:/ultraflux/latest``, fetched through the model cache; the
evaluation is recorded on that version, which is what the scheduled deployment in ``prefect.yaml`` runs) — or
from an existing directory (``images_dir=...``, any generator; prompts from a file or the images' sidecars).

    python -m flows.eval_flow --model artifacts/tiny-ultraflux --config params.yaml
    python -m flows.eval_flow --model-uri models:/ultraflux@champion
    python -m flows.eval_flow --images-dir my_images --prompts-file prompts.txt --no-register
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from ultraflux.config import UltraFluxConfig, resolve_config
from ultraflux.deploy import SharedRoots, with_roots
from ultraflux_core.config import dump_config
from ultraflux_core.tracking.lineage import config_hash, dvc_data_hash, git_sha
from ultraflux_core.tracking.registry import (
    champion_scores,
    promote_if_better,
    record_evaluation,
    register_checkpoint,
    version_description,
)
from ultraflux_core.tracking.uri import client_for, is_registered_model_uri, is_registry_uri, registered_version
from ultraflux_data.config import ComputeConfig
from ultraflux_eval.config import EvalConfig
from ultraflux_eval.errors import EvalError
from ultraflux_eval.protocol.evaluate import load_image_dir, validate_spec
from ultraflux_eval.protocol.logging import reachable_tracking_uri
from ultraflux_eval.protocol.session import run_evaluation
from ultraflux_model.checkpoint.resolve import resolve_checkpoint
from ultraflux_model.config import GenerateConfig, ServeConfig
from ultraflux_model.serving.publish import log_release
from ultraflux_model.serving.pyfunc import serving_config
from ultraflux_model.training.latent_cache import INDEX

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_eval_config(config: list[str], overrides: list[str], out: Path) -> UltraFluxConfig:
    """Layered config whose ``eval.tracking`` falls back to the root tracking resolution (``tracking.uri``, then
    ``$MLFLOW_TRACKING_URI``, then ``<out>/mlflow.db``), so one setting points training and evaluation."""
    cfg = resolve_config(config, overrides)
    if cfg.eval.tracking.tracking_uri is None:
        uri = cfg.tracking.resolve_uri(out)
        tracking = cfg.eval.tracking.model_copy(update={"tracking_uri": uri})
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"tracking": tracking})})
    return cfg


@task(name="generate-benchmark")
def generate_benchmark(
    model: str, gen: GenerateConfig, spec_cfg: EvalConfig, out_dir: Path, compute: ComputeConfig,
    tracking_uri: str | None = None,
) -> tuple[list[Path], list[str], list[str]]:
    """The benchmark grid (prompts × aspect ratios × seeds) on the compute engine, resuming a killed run's cells;
    returns paths, prompts and aspect labels."""
    from ultraflux_data.benchmark import run_benchmark  # torch and diffusers load with it: only when generating

    run = run_benchmark(model, spec_cfg.benchmark, gen, out_dir, compute, tracking_uri=tracking_uri)
    get_run_logger().info("benchmark grid: %d cells generated, %d reused from an earlier run", run.generated,
                          run.reused)
    return [g.image.path for g in run.images], [g.image.prompt for g in run.images], [g.aspect for g in run.images]


@task(name="collect-images")
def collect_images(images_dir: str, prompts_file: str | None) -> tuple[list[Path], list[str]]:
    return load_image_dir(Path(images_dir), Path(prompts_file) if prompts_file else None)


@task(name="evaluate-and-log")
def evaluate_and_log(
    paths: list[Path],
    prompts: list[str],
    labels: list[str] | None,
    cfg: EvalConfig,
    out_dir: Path,
    params: dict[str, Any],
    lineage: dict[str, str],
) -> tuple[str | None, dict[str, dict[str, float]]]:
    """Evaluate, write the report (header, banner, the paper's and the champion's columns), log one run tagged with
    the same lineage the registered version gets."""
    champion = champion_scores(cfg.tracking.resolve_uri(), cfg.promotion)
    about = {"git sha": lineage["git_sha"], "data (dvc_data_hash)": lineage["dvc_data_hash"]}
    run = run_evaluation(paths, prompts, cfg, out_dir, aspects=labels, params=params, tags=lineage, about=about,
                         champion=champion)  # fmt: skip
    return run.run_id, run.results.table


@task(name="log-release")
def log_model_release(model: str, uri: str, run_id: str, gen: GenerateConfig, serve: ServeConfig) -> str:
    """The checkpoint as a pyfunc MLflow model of the evaluation run (blobs content-addressed); its model URI."""
    logged = log_release(resolve_checkpoint(model), uri, run_id, serving_config(gen, serve))
    get_run_logger().info("logged %s: %d of %d blobs uploaded (%.1f MB in the release)", logged.model_uri,
                          len(logged.uploaded), len(set(s for s, _ in logged.manifest.files.values())),
                          logged.manifest.total_bytes / 1e6)
    return logged.model_uri


@task(name="register-and-promote")
def register_and_promote(
    cfg: EvalConfig, run_id: str, source: str, version: str | None, provenance: dict[str, str], promote: bool,
    changes: str = "",
) -> dict[str, Any]:
    """Register the model at ``source`` as a new version (or point an existing ``version`` at this evaluation),
    then apply the promotion rule when ``promote``."""
    uri = cfg.tracking.resolve_uri()
    name = cfg.promotion.model_name
    if version is None:
        tags = {**provenance, "eval_run_id": run_id}
        scores = client_for(uri).get_run(run_id).data.metrics
        description = version_description(changes or f"evaluated {source}", scores, tags, cfg.backbones.source)
        version = register_checkpoint(uri, name, source, tags, description)
    else:
        record_evaluation(uri, name, version, run_id)
    if not promote:
        return {"version": version, "promoted": False, "reason": "promotion disabled"}
    decision = promote_if_better(uri, version, cfg.promotion)
    outcome = "promoted" if decision.promoted else "kept"
    get_run_logger().info("model %s v%s: %s (%s)", name, version, outcome, decision.reason)
    return {"version": version, "promoted": decision.promoted, "reason": decision.reason,
            "candidate": decision.candidate_value, "champion": decision.champion_value}


@flow(name="ultraflux-eval", log_prints=True)
def eval_flow(
    model: str | None = None,
    model_uri: str | None = None,
    images_dir: str | None = None,
    prompts_file: str | None = None,
    config: list[str] | None = None,
    overrides: list[str] | None = None,
    out: str = "artifacts/eval",
    register_version: bool = True,
    promote: bool = True,
    roots: SharedRoots | None = None,
    changes: str | None = None,
) -> dict[str, Any]:
    """Evaluate one model (or a directory of images) on the benchmark, log one MLflow run, maybe promote.

    Exactly one image source: ``model`` (checkpoint dir or hub id; registered as a new version), ``model_uri``
    (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/NAME/latest``: the evaluation is recorded on
    that version; ``runs:/…`` or ``models:/<model_id>``: registered as a new version) or ``images_dir``.
    ``roots`` moves ``artifacts/…`` outputs (the config's and ``out``) onto shared folders (deployments).
    ``changes`` opens the registered version's description (what is new in it; the release flow names the parts).
    """
    if roots is not None:
        out = roots.rebase(out)
    cfg = resolve_eval_config(list(config or []), with_roots(config, overrides, roots), Path(out))
    if sum(x is not None for x in (model, model_uri, images_dir)) != 1:
        raise EvalError("give exactly one of model=..., model_uri=... or images_dir=...")
    if model is not None and is_registry_uri(model):
        raise EvalError(f"{model} is a registry URI: pass it as model_uri=... (model= is a checkpoint dir or hub id)")
    uri = reachable_tracking_uri(cfg.eval.tracking)  # before generating anything
    out_dir = Path(out)
    version = None
    generator = model or model_uri
    if model_uri is not None and is_registered_model_uri(model_uri):
        name, version = registered_version(uri, model_uri)
        if register_version and name != cfg.eval.promotion.model_name:
            raise EvalError(f"{model_uri} is a version of {name!r}, but eval.promotion.model_name is "
                            f"{cfg.eval.promotion.model_name!r}: set it, or pass register_version=False")
        generator = f"models:/{name}/{version}"  # pinned: an alias may move while we generate
    if generator is not None:
        validate_spec(cfg.eval.benchmark)  # sizes, reference set: fail before generating
        paths, prompts, labels = generate_benchmark(generator, cfg.generate, cfg.eval, out_dir / "images", cfg.compute,
                                                    uri)
    else:
        paths, prompts = collect_images(images_dir, prompts_file)
        labels = None
    params = {"model": model or model_uri or "", "images_dir": images_dir or "", "model_version": version or ""}
    # One lineage for the evaluation run and the version it registers (the same dvc_data_hash on both).
    lineage = {
        "git_sha": git_sha(REPO_ROOT),
        "dvc_data_hash": dvc_data_hash(Path(cfg.train.cache_dir), INDEX, REPO_ROOT / "dvc.lock"),
        "config_hash": config_hash(dump_config(cfg)),
    }
    run_id, table = evaluate_and_log(paths, prompts, labels, cfg.eval, out_dir / "report", params, lineage)
    result: dict[str, Any] = {"run_id": run_id, "table": table, "tracking_uri": uri,
                              "report": str(out_dir / "report" / "report.html")}
    if register_version and generator is not None:
        source = model_uri if model is None else log_model_release(model, uri, run_id, cfg.generate, cfg.serve)
        result["registry"] = register_and_promote(cfg.eval, run_id, source, version, lineage, promote,
                                                  changes or f"evaluated {model or model_uri}")  # fmt: skip
    return result


if __name__ == "__main__":
    from typing import Annotated

    import typer

    def main(
        model: Annotated[str | None, typer.Option()] = None,
        model_uri: Annotated[str | None, typer.Option()] = None,
        images_dir: Annotated[str | None, typer.Option()] = None,
        prompts_file: Annotated[str | None, typer.Option()] = None,
        config: Annotated[list[str] | None, typer.Option()] = None,
        set_: Annotated[list[str] | None, typer.Option("--set")] = None,
        out: Annotated[str, typer.Option()] = "artifacts/eval",
        register: Annotated[bool, typer.Option()] = True,
    ) -> None:
        print(eval_flow(model=model, model_uri=model_uri, images_dir=images_dir, prompts_file=prompts_file,
                        config=config, overrides=set_, out=out, register_version=register))

    typer.run(main)
