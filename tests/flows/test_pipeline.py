"""The main job end to end (what `make demo` runs): tiny checkpoint → data → SACL → VAE → release + eval + registry.

Runs `python -m flows.pipeline` in a child process whose working directory is ``tmp_path`` (every relative
``artifacts/`` path of params.yaml lands there), with its own ``PREFECT_HOME`` (ephemeral API).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import REPO, REPO_PATH

# Child processes import this checkout's packages (not whatever an editable install points at), so a mutated
# copy of the repository (tests/mutations) is what the flows run.

@pytest.mark.slow
def test_pipeline_runs_end_to_end_and_promotes_a_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=REPO_PATH)
    cmd = [sys.executable, "-m", "flows.pipeline", "--config", str(REPO / "params.yaml")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # what a newcomer reads (issue 20): a line per step, the closing summary, and no torch.distributed deprecations
    steps = [line[:5] for line in proc.stdout.splitlines() if re.match(r"\[\d/4\] ", line)]
    assert steps == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert "UltraFlux demo: done" in proc.stdout and "champion: models:/ultraflux/1 (this release)" in proc.stdout
    assert "make ui" in proc.stdout and "| metric | starting VAE | after training |" in proc.stdout
    assert "torch.distributed" not in proc.stderr

    artifacts = tmp_path / "artifacts"
    releases = sorted((artifacts / "release").glob("ultraflux-*"))
    assert len(releases) == 1
    from mlflow.tracking import MlflowClient
    from ultraflux_model import UltraFluxTransformer2DModel
    from ultraflux_model.checkpoint.layout import check_checkpoint_layout, fingerprint
    from ultraflux_model.checkpoint.resolve import resolve_checkpoint

    check_checkpoint_layout(releases[0])
    assert f"release   {releases[0]}" in proc.stdout or f"release   {releases[0].relative_to(tmp_path)}" in proc.stdout
    assert (artifacts / "release" / "eval" / "report" / "report.html").is_file()
    trained = fingerprint(artifacts / "train" / "stage2" / "export" / "transformer")
    assert fingerprint(releases[0] / "transformer") == trained  # the release carries the stage-2 weights
    assert fingerprint(releases[0] / "vae") == fingerprint(artifacts / "vae-post" / "vae")
    UltraFluxTransformer2DModel.from_pretrained(releases[0] / "transformer")

    uri = f"sqlite:///{artifacts / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiments = {e.name for e in client.search_experiments()}
    assert {"ultraflux-train", "ultraflux-eval"} <= experiments
    champion = client.get_model_version_by_alias("ultraflux", "champion")
    monkeypatch.setenv("ULTRAFLUX_MODEL_CACHE", str(tmp_path / "model-cache"))
    # the registered champion is the released checkpoint, byte for byte, fetched through the model cache
    assert fingerprint(resolve_checkpoint("models:/ultraflux@champion", uri)) == fingerprint(releases[0])
    eval_run = client.get_run(champion.tags["eval_run_id"])
    assert any(key.endswith("/16:9") for key in eval_run.data.metrics)
    assert not (tmp_path / "mlruns").exists()  # artifacts stay beside the SQLite store

    losses = [json.loads(line)["loss"] for line in (artifacts / "train" / "stage1" / "metrics.jsonl").read_text().splitlines()]
    quarter = len(losses) // 4
    assert sum(losses[-quarter:]) / quarter < sum(losses[:quarter]) / quarter  # the loss falls on average

    # README's web-app example runs as written after the demo, from the demo's folder and without a tracking URI
    # (the demo's store is the default): a real comparison, the trained champion beside the untrained base
    from ultraflux_model.app.models import pick_models

    example = next(line for line in (REPO / "README.md").read_text().splitlines()
                   if line.startswith(".venv/bin/ultraflux ui "))
    refs = re.findall(r"--(?:model|compare) (\S+)", example)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert len(refs) == 2 and fingerprint(resolve_checkpoint(refs[0])) != fingerprint(resolve_checkpoint(refs[1]))
    # `make ui`: the champion alone, never beside its own release folder
    assert pick_models(artifacts / "release") == ("models:/ultraflux@champion", None)
