"""prefect.yaml against a real Prefect server: both work pools created as docs/deploy.md says,
`prefect --no-prompt deploy --all` registers every declared deployment (pools, pull steps, the nightly cron),
a process worker runs one deployment to completion from a git clone of the code under test, and the Kubernetes
worker's own code path turns a flow run of a `-k8s` deployment into a Job manifest that validates strictly."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.code_snapshot import git_snapshot
from tests.infra_checks import CLAIMS, NAMESPACE, pod_volumes_and_mounts, validate_strict

REPO = Path(__file__).resolve().parents[2]

# Reads the server's view: the registered deployments, the flow runs' states, and the Job manifest the
# Kubernetes worker would submit for one flow run (KubernetesWorkerJobConfiguration.resolve_for_flow_run is
# what KubernetesWorker calls before creating the Job).
INSPECT = """
import asyncio, json, sys
from prefect.client.orchestration import get_client
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

async def main(k8s_run_id, process_run_id):
    async with get_client() as client:
        out = {"deployments": {}}
        for d in await client.read_deployments():
            out["deployments"][d.name] = {
                "pool": d.work_pool_name, "queue": d.work_queue_name, "pull": d.pull_steps,
                "parameters": d.parameters, "job_variables": d.job_variables,
                "schedules": [{"cron": s.schedule.cron, "timezone": s.schedule.timezone, "active": s.active}
                              for s in d.schedules]}
        run = await client.read_flow_run(process_run_id)
        out["process_run_state"] = run.state.type.value
        k8s_run = await client.read_flow_run(k8s_run_id)
        pool = await client.read_work_pool("ultraflux-k8s")
        config = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
            k8s_run, client=client, work_pool=pool, worker_name="test-worker")
        out["job"] = config.job_manifest
        out["job_namespace"] = config.namespace
        json.dump(out, sys.stdout, default=str)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _prefect(env: dict[str, str], *args: str, cwd: Path = REPO) -> str:
    proc = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _flow_run_id(output: str) -> str:
    """The UUID `prefect deployment run` prints (`└── UUID: …`)."""
    match = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert match, output
    return match.group(1)


@pytest.mark.slow
def test_deploy_all_registers_every_deployment_and_one_runs(tmp_path, prefect_server):
    src = tmp_path / "src"
    env = {**prefect_server, **git_snapshot(src), "ULTRAFLUX_SHARED_ROOT": str(tmp_path / "shared")}
    # the pools exactly as docs/deploy.md creates them (the kubernetes one with our base job template)
    _prefect(env, "work-pool", "create", "ultraflux-process", "--type", "process")
    _prefect(env, "work-pool", "create", "ultraflux-k8s", "--type", "kubernetes",
             "--base-job-template", str(REPO / "infra" / "k8s" / "job-template.json"))
    _prefect(env, "--no-prompt", "deploy", "--all", cwd=src)  # from the snapshot: pins its commit
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True,
                            check=True).stdout.strip()

    # one run on the process pool: the worker clones the snapshot and runs the data flow from the clone
    # (`config: [params.yaml]` is relative: it resolves only if the pull step put the flow run in the clone)
    data_root = tmp_path / "data-out"
    params = {"until": "ingest", "overrides": [f"data.root={data_root}", "data.synthetic.n=4",
                                               "data.synthetic.base_side=96"]}
    process_run = _flow_run_id(_prefect(env, "deployment", "run", "ultraflux-data/data-pipeline", "--params",
                                        json.dumps(params)))
    k8s_run = _flow_run_id(_prefect(env, "deployment", "run", "ultraflux-eval/eval-latest-nightly-k8s"))
    _prefect(env, "worker", "start", "--pool", "ultraflux-process", "--run-once", cwd=tmp_path)

    proc = subprocess.run([sys.executable, "-c", INSPECT, k8s_run, process_run], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(proc.stdout)

    assert seen["process_run_state"] == "COMPLETED"
    assert (data_root / "ingest" / "manifest.parquet").is_file()
    assert json.loads((data_root / "metrics" / "ingest.json").read_text())["ok"] > 0

    # every deployment of prefect.yaml, as declared
    declared = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    registered = seen["deployments"]
    assert set(registered) == set(declared)
    for name, spec in declared.items():
        got = registered[name]
        assert got["pool"] == spec["work_pool"]["name"], name
        declared_params = json.loads(json.dumps(spec["parameters"]).replace("{{ $ULTRAFLUX_SHARED_ROOT }}",
                                                                               env["ULTRAFLUX_SHARED_ROOT"]))
        assert got["parameters"] == declared_params, name  # the shared roots templated at deploy
        assert all(Path(p).is_absolute() for p in got["parameters"]["roots"].values()), name
        assert got["job_variables"] == spec["work_pool"]["job_variables"], name
        step = next(iter(got["pull"][0]))
        if got["pool"] == "ultraflux-k8s":
            assert got["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/ultraflux"}}]
        else:
            assert step == "prefect.deployments.steps.git_clone"
            assert got["pull"][0][step]["repository"] == env["ULTRAFLUX_GIT_REPOSITORY"]  # templated at deploy
            assert got["pull"][0][step]["commit_sha"] == commit  # pinned to the deploying commit
            assert got["pull"][1] == {"ultraflux.deploy.use_checkout": {"directory": "{{ clone.directory }}"}}
    assert registered["eval-latest-nightly"]["schedules"] == [{"cron": "0 3 * * *", "timezone": "UTC", "active": True}]
    assert registered["eval-latest-nightly-k8s"]["schedules"][0]["active"] is False  # one nightly per site

    # the Job the Kubernetes worker would create for the nightly evaluation, through the worker's own code path
    job = seen["job"]
    assert seen["job_namespace"] == NAMESPACE == job["metadata"]["namespace"]
    pod = job["spec"]["template"]["spec"]
    # prefect-kubernetes 0.8.0 refuses templates without spec.template.spec.{parallelism,completions} (its own
    # check, not Kubernetes'); they are not PodSpec fields, so the API server drops them. Validate the rest strictly.
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    validate_strict(job)
    container = pod["containers"][0]
    assert container["args"][:3] == ["prefect", "flow-run", "execute"]  # run as given: the image has no ENTRYPOINT
    assert "command" not in container
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # the deployment's job variable
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    env_names = {e["name"] for e in container["env"]}
    assert {"PREFECT__FLOW_RUN_ID", "HF_HOME"} <= env_names
    assert container["envFrom"] == [{"secretRef": {"name": "ultraflux-endpoints"}},
                                    {"secretRef": {"name": "hf-token", "optional": True}}]  # HF_TOKEN, optional
    volumes, mounts = pod_volumes_and_mounts(pod)
    assert {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v} == CLAIMS
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
