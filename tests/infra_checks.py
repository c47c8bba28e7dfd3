"""Shared checks of the Kubernetes manifests (tests/test_infra.py, tests/flows/test_deployments.py)."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "infra" / "k8s"
K8S_VERSION = "1.32.0"  # the cluster version we target (docs/deploy.md); every manifest must pass its strict schema
NAMESPACE = "ultraflux"
CLAIMS = {"ultraflux-data", "ultraflux-runs", "ultraflux-releases", "ultraflux-hf-cache", "ultraflux-models"}


# API groups of custom resources (KubeRay's operator): not in the core schemas, checked by custom_resource_problems.
CUSTOM_GROUPS = ("ray.io/",)


def _all_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def k8s_documents() -> list[tuple[str, dict]]:
    """Every core-API document under infra/k8s (what the strict 1.32 schemas validate)."""
    return [(name, doc) for name, doc in _all_documents() if not doc["apiVersion"].startswith(CUSTOM_GROUPS)]


def custom_documents() -> list[tuple[str, dict]]:
    """Every custom resource under infra/k8s (the KubeRay RayService)."""
    return [(name, doc) for name, doc in _all_documents() if doc["apiVersion"].startswith(CUSTOM_GROUPS)]


POD_TEMPLATE = "PodTemplateSpec"  # a core pod template inside a custom resource: validated strictly as one
# The ray.io/v1 RayService fields a manifest of ours may use, from KubeRay's Go types (ray-operator/apis/ray/v1:
# rayservice_types.go, raycluster_types.go, KubeRay 1.4): the CRD's schema for the parts we write, without its
# 1 MB of embedded core schemas (those parts are the pod templates, validated with the core schemas instead).
_WORKER_GROUP = {"groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int, "idleTimeoutSeconds": int,
                 "rayStartParams": {str: str}, "template": POD_TEMPLATE, "numOfHosts": int, "suspend": bool}
RAY_SERVICE = {
    "apiVersion": str, "kind": str, "metadata": "ObjectMeta",
    "spec": {
        "serveConfigV2": str,
        "excludeHeadPodFromServeSvc": bool,
        "rayClusterConfig": {
            "rayVersion": str, "enableInTreeAutoscaling": bool, "suspend": bool,
            "headGroupSpec": {"rayStartParams": {str: str}, "template": POD_TEMPLATE, "serviceType": str,
                              "enableIngress": bool},
            "workerGroupSpecs": [_WORKER_GROUP],
        },
    },
}


def custom_resource_problems(doc: dict, shape: object = RAY_SERVICE, path: str = "") -> list[str]:
    """Every field of ``doc`` outside ``shape`` or of the wrong type (dotted paths); core parts (metadata, pod
    templates) validated strictly against the 1.32 schemas."""
    if shape == POD_TEMPLATE or shape == "ObjectMeta":
        wrapped = ({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": doc}
                   if shape == POD_TEMPLATE else {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc})
        try:
            validate_strict(wrapped)
        except kubernetes_validate.ValidationError as err:
            return [f"{path}: {err.message}"]
        return []
    if isinstance(shape, type):
        ok = isinstance(doc, shape) and not (shape is int and isinstance(doc, bool))
        return [] if ok else [f"{path}: expected {shape.__name__}, got {type(doc).__name__}"]
    if isinstance(shape, list):
        if not isinstance(doc, list):
            return [f"{path}: expected a list"]
        return [p for k, item in enumerate(doc) for p in custom_resource_problems(item, shape[0], f"{path}[{k}]")]
    if not isinstance(doc, dict):
        return [f"{path}: expected a mapping"]
    if list(shape) == [str]:  # map[string]string
        return [f"{path}.{k}: expected a string" for k, v in doc.items() if not isinstance(v, str)]
    problems = [f"{path}.{k}: unknown field" for k in doc if k not in shape]
    return problems + [p for k, v in doc.items() if k in shape
                       for p in custom_resource_problems(v, shape[k], f"{path}.{k}".lstrip("."))]


def validate_strict(manifest: dict) -> None:
    """Raises kubernetes_validate.ValidationError on any schema violation, unknown fields included."""
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def job_template() -> dict:
    return json.loads((K8S / "job-template.json").read_text())


def pod_volumes_and_mounts(pod_spec: dict) -> tuple[dict[str, dict], dict[str, str]]:
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in pod_spec["containers"][0]["volumeMounts"]}
    return volumes, mounts
