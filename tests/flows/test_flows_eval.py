"""The evaluation flow and its scheduled deployment.

Against a Prefect API server on loopback with its own ``PREFECT_HOME`` and a SQLite MLflow under ``tmp_path``,
the flow runs once on a directory of procedurally generated images and once generating with the tiny checkpoint
(register + promote); then ``prefect deploy`` reads ``prefect.yaml`` and the nightly deployment runs once on a
process work pool (``model_uri: models:/ultraflux/latest``: re-evaluates the latest registered version, fetched
from the registry through the model cache); finally a candidate that is worse by construction goes through the
same register-and-promote and must leave the champion where it is. The image directory has unequal aspect
groups, so the logged ``overall`` pins the per-image mean.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.code_snapshot import git_snapshot
from tests.servers import REPO

# Child processes import this checkout's packages (not whatever an editable install points at), so a mutated
# copy of the repository (tests/mutations) is what the flows run.
DRIVER = """
import json, sys
from flows.eval_flow import eval_flow
args = json.loads(sys.argv[1])
common = dict(overrides=args["overrides"])
out = {}
out["dir"] = eval_flow(images_dir=args["images_dir"], prompts_file=args["prompts_file"], out=args["out"] + "/dir",
                      **common)
out["model"] = eval_flow(model=args["model"], out=args["out"] + "/model", **common)
json.dump(out, open(args["result"], "w"), default=str)
"""

WORSE_DRIVER = """
import json, sys
from flows.eval_flow import eval_flow
args = json.loads(sys.argv[1])
out = eval_flow(model=args["model"], out=args["out"], overrides=args["overrides"])
json.dump(out, open(args["result"], "w"), default=str)
"""


def broken_decoder_copy(checkpoint: Path, out: Path) -> Path:
    """The checkpoint with the VAE decoder's output conv zeroed: every image it makes is one flat grey, so its
    Shannon entropy is 0 — a candidate that is worse than any real model, by construction."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, out)
    weights = out / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    for key in ("decoder.conv_out.weight", "decoder.conv_out.bias"):
        state[key] = state[key] * 0
    save_file(state, str(weights))
    return out


def test_prefect_yaml_declares_a_cron_deployment_whose_entrypoint_resolves():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployment = next(d for d in spec["deployments"] if d["name"] == "eval-latest-nightly")
    assert deployment["schedules"][0]["cron"] == "0 3 * * *"
    assert deployment["work_pool"]["name"] == "ultraflux-process"
    assert deployment["parameters"]["model_uri"] == "models:/ultraflux/latest"
    flow = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
    assert flow.name == "ultraflux-eval"
    # every deployment parameter is a parameter of the flow
    assert set(deployment["parameters"]) <= set(flow.parameters.properties)


@pytest.fixture()
def prefect_api(prefect_server, tmp_path) -> dict[str, str]:
    """The environment that points Prefect clients at a real server (tests/servers.py), prefect.yaml's git_clone
    pull step at a snapshot of the code under test (tests/code_snapshot.py), and a private model cache."""
    return {**prefect_server, **git_snapshot(tmp_path / "src"), "ULTRAFLUX_MODEL_CACHE": str(tmp_path / "model-cache"),
            "ULTRAFLUX_SHARED_ROOT": str(tmp_path / "shared")}


def _prefect(env: dict[str, str], *args: str, cwd: Path = REPO) -> str:
    proc = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_eval_flow_and_nightly_deployment(tmp_path, tiny_checkpoint, prefect_api):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    rng = np.random.default_rng(0)
    # unequal aspect groups (1:1 ×3, 16:9 ×2, 2:1, 1:2, 2.39:1 ×1): `overall` must be the per-image mean
    sizes = [(128, 128)] * 3 + [(224, 128)] * 2 + [(256, 128), (128, 256), (320, 128)]
    for i, (w, h) in enumerate(sizes):
        rgb = np.clip(128 + rng.normal(0, 10 + 8 * i, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(images_dir / f"{i:02d}.png")
    (tmp_path / "prompts.txt").write_text("".join(f"prompt {i}\n" for i in range(len(sizes))))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cache = tmp_path / "cache"  # the latent cache a Prefect-path run trained on (no dvc.lock entry for it)
    cache.mkdir()
    (cache / "index.parquet").write_bytes(b"the cache index")
    args = {
        "images_dir": str(images_dir),
        "prompts_file": str(tmp_path / "prompts.txt"),
        "model": str(tiny_checkpoint),
        "out": str(tmp_path / "out"),
        "result": str(tmp_path / "result.json"),
        "overrides": [
            f"eval.tracking.tracking_uri={uri}",
            "eval.benchmark.prompts=[a red fox in snow]",
            "eval.benchmark.metrics=[glcm,compression_ratio,shannon_entropy,clip_score]",
            "generate.steps=2",
            "generate.dtype=fp32",
            "eval.promotion.metric=shannon_entropy/overall",
            f"train.cache_dir={cache}",
        ],
    }
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(args)], cwd=REPO, env=prefect_api,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((tmp_path / "result.json").read_text())

    # the declared deployment, exactly as `prefect deploy` reads it, run once by a process worker
    _prefect(prefect_api, "work-pool", "create", "ultraflux-process", "--type", "process")
    _prefect(prefect_api, "--no-prompt", "deploy", "--name", "eval-latest-nightly", cwd=tmp_path / "src")
    inspected = _prefect(prefect_api, "deployment", "inspect", "ultraflux-eval/eval-latest-nightly")
    assert "0 3 * * *" in inspected
    nightly_params = {"overrides": args["overrides"], "out": str(tmp_path / "out" / "nightly")}
    _prefect(prefect_api, "deployment", "run", "ultraflux-eval/eval-latest-nightly", "--params",
             json.dumps(nightly_params))
    _prefect(prefect_api, "worker", "start", "--pool", "ultraflux-process", "--run-once")

    from ultraflux_core.tracking.uri import client_for

    client = client_for(uri)
    aspects = ["1:1", "16:9", "2:1", "1:2", "2.39:1", "overall"]
    version = client.get_model_version_by_alias("ultraflux", "champion")
    nightly_run = client.get_run(version.tags["eval_run_id"])  # the deployment re-pointed v1 at its run
    assert nightly_run.info.run_id not in (out["dir"]["run_id"], out["model"]["run_id"])
    assert nightly_run.data.params["model_version"] == "1"
    out["nightly"] = {"run_id": nightly_run.info.run_id}
    for key in ("dir", "model", "nightly"):
        metrics = client.get_run(out[key]["run_id"]).data.metrics
        assert {f"{m}/{a}" for m in ("glcm", "clip_score", "compression_ratio") for a in aspects} <= set(metrics)
    assert "registry" not in out["dir"]  # a directory of images has no model to register
    assert out["dir"]["table"]["overall"]["n_images"] == len(sizes)
    from ultraflux_eval.metrics import scores

    per_image = [scores.glcm_score(p) for p in sorted(images_dir.glob("*.png"))]
    groups = {}
    for value, size in zip(per_image, sizes, strict=True):
        groups.setdefault(size, []).append(value)
    logged = client.get_run(out["dir"]["run_id"]).data.metrics["glcm/overall"]
    assert logged == pytest.approx(np.mean(per_image), rel=1e-9)
    assert logged != pytest.approx(np.mean([np.mean(v) for v in groups.values()]), rel=1e-6)
    assert out["model"]["table"]["overall"]["n_images"] == 5  # one prompt x five aspect ratios
    assert out["model"]["registry"]["promoted"] and out["model"]["registry"]["version"] == "1"
    # the nightly run re-evaluated the latest version: same model, same seeds -> same numbers, alias stays
    first = out["model"]["table"]["overall"]["clip_score"]
    assert nightly_run.data.metrics["clip_score/overall"] == pytest.approx(first)
    assert str(version.version) == "1" and "/models/m-" in version.source  # the logged pyfunc release
    nightly_sidecars = [json.loads(p.read_text()) for p in (tmp_path / "out" / "nightly" / "images").rglob("*.json")]
    assert {s["model"] for s in nightly_sidecars} == {"models:/ultraflux/1"}  # pinned, fetched from the registry
    assert {"git_sha", "dvc_data_hash", "config_hash"} <= set(version.tags)
    # one lineage: the evaluation run that registered v1 carries the very tags of the version, and a description
    registering_run = client.get_run(out["model"]["run_id"])
    for key in ("git_sha", "dvc_data_hash", "config_hash"):
        assert registering_run.data.tags[key] == version.tags[key]
    assert version.tags["dvc_data_hash"] == "sha256:" + hashlib.sha256(b"the cache index").hexdigest()
    assert version.description.startswith("evaluated ") and "Scores (overall, tiny backbones" in version.description
    assert f"evaluation run {out['model']['run_id']}" in version.description
    assert registering_run.info.run_name.startswith("eval tiny-ultraflux · ")
    report = (tmp_path / "out" / "model" / "report" / "report.html").read_text()
    assert "content hash (sha256)" in report and "tiny RANDOM backbones" in report
    assert len(list((tmp_path / "out" / "nightly" / "images").rglob("*.png"))) == 5
    grids = {f.path for f in client.list_artifacts(out["model"]["run_id"], "grids")}
    assert len(grids) == 5
    generated = sorted((tmp_path / "out" / "model" / "images").rglob("*.png"))
    assert len(generated) == 5 and all(p.with_suffix(".json").is_file() for p in generated)

    # A worse candidate through the flow's register-and-promote: registered as v2, refused, the alias stays on v1.
    worse = {"model": str(broken_decoder_copy(tiny_checkpoint, tmp_path / "broken")), "out": str(tmp_path / "worse"),
             "result": str(tmp_path / "worse.json"), "overrides": args["overrides"]}
    proc = subprocess.run([sys.executable, "-c", WORSE_DRIVER, json.dumps(worse)], cwd=REPO, env=prefect_api,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    registry = json.loads((tmp_path / "worse.json").read_text())["registry"]
    assert registry["version"] == "2" and registry["promoted"] is False, registry
    assert registry["candidate"] == 0.0 and registry["champion"] > 0.0
    assert str(client.get_model_version_by_alias("ultraflux", "champion").version) == "1"
