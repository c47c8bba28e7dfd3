"""End to end into a SQLite MLflow: one run per evaluation with metrics, plots, grids and reports; `compare`;
registry promotion by the rule, also under concurrent promotions; unreachable servers fail before work."""

from __future__ import annotations

import multiprocessing
import socket

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner
from ultraflux_eval.cli import app
from ultraflux_eval.config import BenchmarkConfig, EvalConfig, PromotionConfig, TrackingConfig
from ultraflux_eval.errors import EvalError
from ultraflux_eval.registry import latest_version, promote_if_better, record_evaluation, register_checkpoint
from ultraflux_eval.session import run_evaluation
from ultraflux_eval.tracking import client_for, compare_runs, log_evaluation

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
    aspects = ["1:1", "16:9", "2:1", "1:2", "2.39:1", "overall"]
    for metric in METRICS:
        for aspect in aspects:
            key = f"{metric}/{aspect}"
            assert logged.data.metrics[key] == pytest.approx(run.results.table[aspect][metric])
    assert logged.data.params["model"] == "tiny" and logged.data.params["backbones"] == "tiny"
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
    from ultraflux_eval import scores

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


def _fake_eval_run(uri: str, value: float) -> str:
    """A logged evaluation whose promotion metric is ``value``."""
    from ultraflux_eval.evaluate import EvalResults

    table = {"1:1": {"clip_score": value}, "overall": {"clip_score": value}}
    results = EvalResults("t", ["1:1"], ["clip_score"], [], table)
    return log_evaluation(results, _empty_dir(), TrackingConfig(tracking_uri=uri, experiment="reg"))


def _empty_dir():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp())


def _register(uri: str, value: float, name: str = "ultraflux") -> str:
    run_id = _fake_eval_run(uri, value)
    tags = {"git_sha": "abc", "dvc_data_hash": "none", "config_hash": "cfg", "eval_run_id": run_id}
    return register_checkpoint(uri, name, f"/ckpt/{value}", tags)


def test_registry_moves_champion_only_when_the_rule_is_beaten(store):
    uri, name = store, "rule-test"
    rule = PromotionConfig(model_name=name, metric="clip_score/overall", min_delta=0.5)
    client = client_for(uri)
    v1 = _register(uri, 30.0, name)
    assert promote_if_better(uri, v1, rule).promoted
    v2 = _register(uri, 30.4, name)  # better, but not by more than min_delta
    decision = promote_if_better(uri, v2, rule)
    assert not decision.promoted and decision.previous_champion == v1
    v3 = _register(uri, 31.0, name)
    assert promote_if_better(uri, v3, rule).promoted
    assert str(client.get_model_version_by_alias(name, "champion").version) == v3
    tags = client.get_model_version(name, v3).tags
    assert {"git_sha", "dvc_data_hash", "config_hash", "eval_run_id"} <= set(tags)
    lower = PromotionConfig(model_name=name, metric="clip_score/overall", higher_is_better=False)
    assert promote_if_better(uri, v1, lower).promoted  # lower-is-better rule: 30 beats 31
    # a re-evaluation re-points a version at a new run; promotion compares that run
    record_evaluation(uri, name, v2, _fake_eval_run(uri, 10.0))
    assert promote_if_better(uri, v2, lower).promoted
    assert latest_version(uri, name) == (v3, "/ckpt/31.0")
    with pytest.raises(EvalError, match="no registered versions"):
        latest_version(uri, "other")
    with pytest.raises(EvalError, match="needs tags"):
        register_checkpoint(uri, name, "/x", {"git_sha": "a"})


def _promote_worker(uri: str, name: str, version: str, barrier) -> bool:
    barrier.wait()  # all workers compare at the same moment
    return promote_if_better(uri, version, PromotionConfig(model_name=name, metric="clip_score/overall")).promoted


def _champion(uri: str, name: str) -> str:
    return str(client_for(uri).get_model_version_by_alias(name, "champion").version)


def test_worse_candidates_one_by_one_never_move_the_champion(store):
    """Best first, then every worse candidate in turn: each is refused and the alias stays on the best."""
    uri, name = store, "fixed-order"
    rule = PromotionConfig(model_name=name, metric="clip_score/overall")
    best = _register(uri, 35.0, name)
    first = promote_if_better(uri, best, rule)
    assert first.promoted and first.previous_champion is None and first.candidate_value == 35.0
    for value in (34.0, 31.0, 35.0, 20.0):  # worse ones and a tie (not strictly better)
        version = _register(uri, value, name)
        decision = promote_if_better(uri, version, rule)
        assert not decision.promoted, (value, decision.reason)
        assert decision.previous_champion == best and decision.champion_value == 35.0
        assert decision.candidate_value == value
        assert _champion(uri, name) == best
    # the lower-is-better rule reverses the order: the last (20.0) is now the best and takes the alias
    lower = PromotionConfig(model_name=name, metric="clip_score/overall", higher_is_better=False)
    assert promote_if_better(uri, version, lower).promoted and _champion(uri, name) == version


@pytest.mark.slow
def test_concurrent_promotions_leave_the_best_champion(store):
    """Every interleaving must end with the best version as champion.

    Round 1 races all candidates; round 2 races only the worse ones against the best champion, so an
    implementation that promotes the wrong one (or always promotes) ends on a worse version in every interleaving
    of round 2, not only in unlucky ones.
    """
    uri, name = store, "concurrent-test"
    values = [31.0, 35.0, 33.0, 34.0]
    versions = [_register(uri, v, name) for v in values]
    best = versions[1]
    context = multiprocessing.get_context("fork")
    worse = [v for v in versions if v != best]
    with context.Pool(len(versions)) as pool:
        barrier = context.Manager().Barrier(len(versions))
        outcomes = pool.starmap(_promote_worker, [(uri, name, v, barrier) for v in versions])
        assert _champion(uri, name) == best
        assert outcomes[1] is True  # the best beats whatever holds the alias when it compares
        barrier = context.Manager().Barrier(len(worse))
        again = pool.starmap(_promote_worker, [(uri, name, v, barrier) for v in worse])
    assert again == [False] * len(worse)
    assert _champion(uri, name) == best


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
