"""Evaluation flow: generate → evaluate → log → maybe promote.

Thin: every task is one library call. Images come from our generator (``model=...``, or ``from_registry=True``
for the latest registered version, which is what the scheduled deployment in ``prefect.yaml`` runs) or from an
existing directory (``images_dir=...``, any generator; prompts from a file or the images' JSON sidecars).

    python -m flows.eval_flow --model artifacts/tiny-ultraflux --config params.yaml
    python -m flows.eval_flow --images-dir my_images --prompts-file prompts.txt --no-register
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from ultraflux_eval.config import EvalConfig
from ultraflux_eval.errors import EvalError
from ultraflux_eval.evaluate import benchmark_prompts, load_image_dir, validate_spec
from ultraflux_eval.registry import (
    config_hash,
    dvc_data_hash,
    git_sha,
    latest_version,
    promote_if_better,
    record_evaluation,
    register_checkpoint,
)
from ultraflux_eval.session import run_evaluation
from ultraflux_eval.tracking import check_tracking_reachable, resolve_tracking_uri
from ultraflux_model.config import GenerateConfig, UltraFluxConfig, dump_config, resolve_config
from ultraflux_model.training.tracking import resolve_tracking_uri as resolve_root_tracking_uri

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_eval_config(config: list[str], overrides: list[str], out: Path) -> UltraFluxConfig:
    """Layered config whose ``eval.tracking`` falls back to the root tracking resolution (``tracking.uri``, then
    ``$MLFLOW_TRACKING_URI``, then ``<out>/mlflow.db``), so one setting points training and evaluation."""
    cfg = resolve_config(config, overrides)
    if cfg.eval.tracking.tracking_uri is None:
        uri = resolve_root_tracking_uri(cfg.tracking, out)
        tracking = cfg.eval.tracking.model_copy(update={"tracking_uri": uri})
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"tracking": tracking})})
    return cfg


@task(name="generate-benchmark")
def generate_benchmark(
    model: str, gen: GenerateConfig, spec_cfg: EvalConfig, out_dir: Path
) -> tuple[list[Path], list[str], list[str]]:
    """Every prompt at every benchmark aspect ratio, once per seed; returns paths, prompts and aspect labels."""
    from ultraflux_model.inference.pipeline import generate, load_pipeline

    spec = spec_cfg.benchmark
    prompts = benchmark_prompts(spec)
    pipe = load_pipeline(model, dtype=gen.dtype, offload=gen.offload)
    paths: list[Path] = []
    texts: list[str] = []
    labels: list[str] = []
    for seed in spec.seeds:
        for aspect in spec.aspect_ratios:
            images = generate(
                model, prompts, [(aspect.width, aspect.height)], steps=gen.steps, guidance=gen.guidance,
                shift=gen.shift, seed=seed, dtype=gen.dtype, offload=gen.offload, vae_decode=gen.vae_decode,
                max_sequence_length=gen.max_sequence_length,
                out_dir=out_dir / f"seed{seed}" / aspect.name.replace(":", "x"), pipe=pipe, progress=False,
            )
            paths += [image.path for image in images]
            texts += [image.prompt for image in images]
            labels += [aspect.name] * len(images)
    return paths, texts, labels


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
) -> tuple[str | None, dict[str, dict[str, float]]]:
    run = run_evaluation(paths, prompts, cfg, out_dir, aspects=labels, params=params)
    return run.run_id, run.results.table


@task(name="register-and-promote")
def register_and_promote(
    cfg: EvalConfig, run_id: str, source: str, version: str | None, provenance: dict[str, str], promote: bool
) -> dict[str, Any]:
    """Register ``source`` as a new version (or point an existing ``version`` at this evaluation), then apply
    the promotion rule when ``promote``."""
    uri = resolve_tracking_uri(cfg.tracking)
    name = cfg.promotion.model_name
    if version is None:
        version = register_checkpoint(uri, name, source, {**provenance, "eval_run_id": run_id})
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
    images_dir: str | None = None,
    prompts_file: str | None = None,
    from_registry: bool = False,
    config: list[str] | None = None,
    overrides: list[str] | None = None,
    out: str = "artifacts/eval",
    register_version: bool = True,
    promote: bool = True,
) -> dict[str, Any]:
    """Evaluate one model (or a directory of images) on the benchmark, log one MLflow run, maybe promote.

    Exactly one image source: ``model`` (checkpoint dir or hub id), ``from_registry`` (the latest registered
    version of ``eval.promotion.model_name``) or ``images_dir``. Registration needs a model.
    """
    cfg = resolve_eval_config(list(config or []), list(overrides or []), Path(out))
    sources = [model is not None, images_dir is not None, from_registry]
    if sum(sources) != 1:
        raise EvalError("give exactly one of model=..., images_dir=... or from_registry=True")
    uri = resolve_tracking_uri(cfg.eval.tracking)
    check_tracking_reachable(uri, cfg.eval.tracking.connect_timeout_s)  # before generating anything
    out_dir = Path(out)
    version = None
    if from_registry:
        version, model = latest_version(uri, cfg.eval.promotion.model_name)
    if model is not None:
        validate_spec(cfg.eval.benchmark)  # sizes, reference set: fail before generating
        paths, prompts, labels = generate_benchmark(model, cfg.generate, cfg.eval, out_dir / "images")
    else:
        paths, prompts = collect_images(images_dir, prompts_file)
        labels = None
    params = {"model": model or "", "images_dir": images_dir or "", "model_version": version or ""}
    run_id, table = evaluate_and_log(paths, prompts, labels, cfg.eval, out_dir / "report", params)
    result: dict[str, Any] = {"run_id": run_id, "table": table, "tracking_uri": uri}
    if register_version and model is not None:
        provenance = {
            "git_sha": git_sha(REPO_ROOT),
            "dvc_data_hash": dvc_data_hash(REPO_ROOT / "dvc.lock"),
            "config_hash": config_hash(dump_config(cfg)),
        }
        source = str(Path(model).resolve()) if Path(model).exists() else model
        result["registry"] = register_and_promote(cfg.eval, run_id, source, version, provenance, promote)
    return result


if __name__ == "__main__":
    from typing import Annotated

    import typer

    def main(
        model: Annotated[str | None, typer.Option()] = None,
        images_dir: Annotated[str | None, typer.Option()] = None,
        prompts_file: Annotated[str | None, typer.Option()] = None,
        from_registry: Annotated[bool, typer.Option()] = False,
        config: Annotated[list[str] | None, typer.Option()] = None,
        set_: Annotated[list[str] | None, typer.Option("--set")] = None,
        out: Annotated[str, typer.Option()] = "artifacts/eval",
        register: Annotated[bool, typer.Option()] = True,
    ) -> None:
        print(eval_flow(model=model, images_dir=images_dir, prompts_file=prompts_file, from_registry=from_registry,
                        config=config, overrides=set_, out=out, register_version=register))

    typer.run(main)
