"""Registry promotion into a SQLite MLflow: the champion alias moves only when the rule is beaten, also under
concurrent promotions; lookups of the latest version; registration needs its lineage tags."""

from __future__ import annotations

import multiprocessing

import pytest
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.tracking.config import PromotionConfig
from ultraflux_core.tracking.registry import promote_if_better, record_evaluation, register_checkpoint
from ultraflux_core.tracking.uri import client_for, latest_version
from ultraflux_eval.config import TrackingConfig
from ultraflux_eval.protocol.logging import log_evaluation


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its schema costs seconds); tests use their own runs/models."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def _fake_eval_run(uri: str, value: float) -> str:
    """A logged evaluation whose promotion metric is ``value``."""
    from ultraflux_eval.protocol.evaluate import EvalResults

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
    with pytest.raises(UltraFluxError, match="no registered versions"):
        latest_version(uri, "other")
    with pytest.raises(UltraFluxError, match="needs tags"):
        register_checkpoint(uri, name, "/x", {"git_sha": "a"})


def test_versions_carry_a_description_and_the_champion_scores_are_readable(store):
    from ultraflux_core.tracking.registry import champion_scores, version_description

    uri, name = store, "described"
    rule = PromotionConfig(model_name=name, metric="clip_score/overall")
    assert champion_scores(uri, rule) is None  # no registered model yet
    run_id = _fake_eval_run(uri, 30.0)
    tags = {"git_sha": "abc", "dvc_data_hash": "sha256:" + "d" * 64, "config_hash": "c" * 64, "eval_run_id": run_id}
    text = version_description("release ultraflux-x: base with the transformer from stage2",
                               client_for(uri).get_run(run_id).data.metrics, tags, "tiny")  # fmt: skip
    version = register_checkpoint(uri, name, "/ckpt/d", tags, text)
    info = client_for(uri).get_model_version(name, version)
    assert info.description.startswith("release ultraflux-x: base with the transformer from stage2\n")
    assert "clip_score 30" in info.description and "tiny random backbones" in info.description
    assert f"data sha256:{'d' * 64}" in info.description and f"evaluation run {run_id}" in info.description
    assert champion_scores(uri, rule) is None  # registered, but no champion yet
    promote_if_better(uri, version, rule)
    label, scores = champion_scores(uri, rule)
    assert label == f"v{version}" and scores["clip_score/overall"] == 30.0


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
    # spawn, not fork: a pytest worker that ran other tests has threads and signal handlers a forked child would
    # inherit (a forked pool worker blocked on the pool's queue lock then survives terminate() and hangs the test)
    context = multiprocessing.get_context("spawn")
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
