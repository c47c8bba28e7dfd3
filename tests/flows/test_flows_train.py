"""The training and VAE post-training flows, run in a child process with its own ``PREFECT_HOME``
(ephemeral Prefect API) and a SQLite MLflow under ``tmp_path``, on the real data pipeline's tiny cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.servers import REPO, REPO_PATH

# Child processes import this checkout's packages (not whatever an editable install points at), so a mutated
# copy of the repository (tests/mutations) is what the flows run.
DRIVER = """
import json, sys
from ultraflux.config import load_config
from ultraflux_data import stages
from flows.train_flow import train_flow
from flows.vae_flow import vae_flow
args = json.loads(sys.argv[1])
cfg = load_config(args["config"])
for name in ("ingest", "score", "filter", "bucket", "shard", "cache"):
    run = getattr(stages, "run_" + name)
    run(cfg.data) if name in ("filter", "bucket") else run(cfg.data, progress=False)
out = {"train": train_flow(config=[args["config"]]), "again": train_flow(config=[args["config"]], resume=True),
       "vae": vae_flow(config=[args["config"]])}
json.dump(out, open(args["result"], "w"), default=str)
"""


@pytest.mark.parametrize(("name", "flow_name"), [("train-sacl", "ultraflux-train"),
                                                  ("vae-post-training", "ultraflux-vae-post-training")])
def test_deployments_resolve_to_the_flows_and_their_parameters(name: str, flow_name: str) -> None:
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployment = next(d for d in spec["deployments"] if d["name"] == name)
    flow = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
    assert flow.name == flow_name
    assert set(deployment["parameters"]) <= set(flow.parameters.properties)


@pytest.mark.slow
def test_train_flow_runs_every_stage_as_a_subflow_and_vae_flow_improves(tmp_path: Path, tiny_checkpoint: Path) -> None:
    config = {
        "data": {"root": str(tmp_path / "data"), "synthetic": {"n": 16},
                 "cache": {"model": str(tiny_checkpoint), "max_sequence_length": 8}},
        "train": {"model": str(tiny_checkpoint), "cache_dir": str(tmp_path / "data" / "cache"),
                  "run_dir": str(tmp_path / "train"), "sample_sizes": [],
                  "stages": [{"name": "stage1", "steps": 2, "lr": 1e-3, "micro_batch": 2, "global_batch": 2},
                             {"name": "stage2", "subset": "stage2", "t_min": 0.541, "steps": 2, "micro_batch": 1,
                              "global_batch": 1}]},
        "vae_train": {"model": str(tiny_checkpoint), "images": str(tmp_path / "data" / "ingest" / "synthetic"),
                      "out": str(tmp_path / "vae"), "steps": 4, "lr": 1e-3, "heldout": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
    }
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    result = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=REPO_PATH)
    args = json.dumps({"config": str(config_file), "result": str(result)})
    proc = subprocess.run([sys.executable, "-c", DRIVER, args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads(result.read_text())
    assert [row["stage"] for row in out["train"]] == ["stage1", "stage2"]
    assert all(row["steps"] == 2 for row in out["train"])
    assert out["again"] == []  # resume: both stages are done
    assert (tmp_path / "train" / "stage2" / "export" / "transformer" / "config.json").is_file()
    assert out["vae"]["after"]["psnr"] > out["vae"]["before"]["psnr"]
    assert (Path(out["vae"]["export"]) / "config.json").is_file()
