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


def k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def validate_strict(manifest: dict) -> None:
    """Raises kubernetes_validate.ValidationError on any schema violation, unknown fields included."""
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def job_template() -> dict:
    return json.loads((K8S / "job-template.json").read_text())


def pod_volumes_and_mounts(pod_spec: dict) -> tuple[dict[str, dict], dict[str, str]]:
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in pod_spec["containers"][0]["volumeMounts"]}
    return volumes, mounts
