"""End to end into a SQLite MLflow: one run per evaluation with metrics, plots, grids and reports; `compare`;
unreachable servers fail before work. (Registry promotion: tests/core/tracking/test_core_registry.py.)"""

from __future__ import annotations

import socket

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner
from ultraflux_core.tracking.uri import client_for
from ultraflux_eval.cli import app
from ultraflux_eval.config import BenchmarkConfig, EvalConfig, TrackingConfig
from ultraflux_eval.errors import EvalError
from ultraflux_eval.protocol.logging import compare_runs
from ultraflux_eval.protocol.session import run_evaluation

METRICS = ("glcm", "compression_ratio", "shannon_entropy", "flat_percentage", "clip_score", "aesthetic")


def tiny_set(spec: BenchmarkConfig, seed: int) -> tuple[list[np.ndarray], list[str]]:
    rng = np.random.default_rng(seed)
    images, prompts = [], []
    for aspect in spec.aspect_ratios:
        for prompt in spec.prompts:
            yy, xx = np.mgrid[0 : aspect.height, 0 : aspect.width]
            noise = rng.normal(0, rng.uniform(2, 30), (aspect.height, aspect.width))
            base = 128 + 60 * np.sin(xx / rng.uniform(3, 12)) + noise
            images.append(np.clip(base[..., None] + rng.uniform(-50, 50, 3), 0, 255).astype(np.uint8))
            prompts.append(prompt)
    return images, prompts


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its schema costs seconds); tests use their own runs/models."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture()
def config(store) -> EvalConfig:
    return EvalConfig(
        benchmark=BenchmarkConfig(metrics=METRICS, prompts=("a fox", "a lighthouse")),
        tracking=TrackingConfig(tracking_uri=store, experiment="eval-test"),
    )


def test_evaluation_run_logs_metrics_plots_grids_and_report(config, tmp_path):
    images, prompts = tiny_set(config.benchmark, 0)
    run = run_evaluation(images, prompts, config, tmp_path / "report", params={"model": "tiny"}, tags={"who": "test"})
    client = client_for(config.tracking.tracking_uri)
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED" and logged.data.tags["who"] == "test"
    # the run list says what this is: the model, every metric (not just the benchmark's name), the backbones
    assert logged.info.run_name == ("eval tiny · 6 metrics (glcm, compression_ratio, shannon_entropy, …) · "
                                    "aesthetic-eval-tiny · tiny backbones")  # fmt: skip
    aspects = ["1:1", "16:9", "2:1", "1:2", "2.39:1", "overall"]
    for metric in METRICS:
        for aspect in aspects:
            key = f"{metric}/{aspect}"
            assert logged.data.metrics[key] == pytest.approx(run.results.table[aspect][metric])
    assert logged.data.params["model"] == "tiny" and logged.data.params["backbones"] == "tiny"
    assert logged.data.params["comparable_with_paper"] == "no: tiny backbones"
    assert (logged.data.params["seed_policy"], logged.data.params["fid_resize"]) == ("fixed", "legacy")
    artifacts = {f.path for f in client.list_artifacts(run.run_id)}
    assert {"report.md", "report.html", "per_image.csv", "plots", "grids"} <= artifacts
    plots = {f.path for f in client.list_artifacts(run.run_id, "plots")}
    grids = {f.path for f in client.list_artifacts(run.run_id, "grids")}
    assert plots == {f"plots/{m}.png" for m in METRICS}
    assert grids == {f"grids/{a.replace(':', 'x')}.png" for a in aspects[:-1]}
    grid = Image.open(tmp_path / "report" / "grids" / "2.39x1.png")
    assert grid.size == (2 * 256, 256)  # two prompts side by side
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| 2.39:1 |" in report and "![clip_score](plots/clip_score.png)" in report


def test_logged_overall_is_the_per_image_mean_with_unequal_groups(config, tmp_path):
    """3 + 2 + 1 images: MLflow's ``<metric>/overall`` is the mean over images, not over the aspect rows."""
    from ultraflux_eval.metrics import scores

    images, prompts = tiny_set(config.benchmark, 3)
    keep = [0, 1, 2, 3, 4, 6]  # two prompts per aspect: 1:1 ×2, 16:9 ×2, 2:1 ×1, 1:2 ×1
    labels = [a.name for a in config.benchmark.aspect_ratios for _ in config.benchmark.prompts]
    images = [images[i] for i in keep] + [images[0]]  # a third 1:1 image: groups 3 + 2 + 1 + 1
    prompts = [prompts[i] for i in keep] + [prompts[0]]
    labels = [labels[i] for i in keep] + [labels[0]]
    assert sorted({labels.count(a) for a in labels}) == [1, 2, 3]
    run = run_evaluation(images, prompts, config, tmp_path / "report", aspects=labels)
    logged = client_for(config.tracking.tracking_uri).get_run(run.run_id).data.metrics
    assert logged["n_images/overall"] == len(images) and logged["n_images/1:1"] == 3
    for metric, score in (("glcm", scores.glcm_score), ("shannon_entropy", scores.shannon_entropy)):
        values = [score(x) for x in images]
        means = [np.mean([v for v, a in zip(values, labels, strict=True) if a == name])
                 for name in dict.fromkeys(labels)]
        assert logged[f"{metric}/overall"] == pytest.approx(np.mean(values), rel=1e-9)
        assert logged[f"{metric}/overall"] != pytest.approx(np.mean(means), rel=1e-6)


def test_compare_prints_side_by_side(config, tmp_path):
    a = run_evaluation(*tiny_set(config.benchmark, 0), config, tmp_path / "a")
    b = run_evaluation(*tiny_set(config.benchmark, 1), config, tmp_path / "b")
    rows = {k: (x, y) for k, x, y in compare_runs(config.tracking.tracking_uri, a.run_id, b.run_id)}
    assert rows["glcm/1:1"] == (a.results.table["1:1"]["glcm"], b.results.table["1:1"]["glcm"])
    result = CliRunner().invoke(app, ["compare", a.run_id, b.run_id, "--tracking-uri", config.tracking.tracking_uri])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "glcm/2:1" in x)
    assert f"{a.results.table['2:1']['glcm']:.6g}" in line and f"{b.results.table['2:1']['glcm']:.6g}" in line
    missing = CliRunner().invoke(app, ["compare", a.run_id, "0" * 32, "--tracking-uri", config.tracking.tracking_uri])
    assert isinstance(missing.exception, EvalError)


def test_unreachable_server_fails_before_any_work(config, tmp_path):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    unreachable = TrackingConfig(tracking_uri=f"http://127.0.0.1:{port}", connect_timeout_s=2)
    bad = config.model_copy(update={"tracking": unreachable})
    # the image list is also invalid: the tracking error must come first (checked before reading anything)
    with pytest.raises(EvalError, match=f"MLflow tracking server http://127.0.0.1:{port} is unreachable"):
        run_evaluation([tmp_path / "missing.png"], ["x"], bad, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_cli_evaluates_a_directory(config, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    images, prompts = tiny_set(config.benchmark, 2)
    for i, rgb in enumerate(images):
        Image.fromarray(rgb).save(folder / f"{i:02d}.png")
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    args = ["evaluate", str(folder), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "rep"),
            "--set", f"tracking.tracking_uri={config.tracking.tracking_uri}",
            "--set", "benchmark.metrics=[glcm,shannon_entropy,clip_score]"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "| 2.39:1 |" in result.output and "mlflow run:" in result.output
    run_id = result.output.split("mlflow run: ")[1].split()[0]
    metrics = client_for(config.tracking.tracking_uri).get_run(run_id).data.metrics
    assert set(metrics) == {f"{m}/{a}" for m in ("n_images", "glcm", "shannon_entropy", "clip_score")
                            for a in ("1:1", "16:9", "2:1", "1:2", "2.39:1", "overall")}
    bad = CliRunner().invoke(app, ["evaluate", str(folder), "--set", "benchmark.metrics=[nope]"])
    assert isinstance(bad.exception, EvalError) and "benchmark.metrics" in str(bad.exception)
