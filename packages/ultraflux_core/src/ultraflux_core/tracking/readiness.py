"""Readiness of a tracking server for what our flows do with it: not only ``/health`` (which answers while the
artifact store behind it is broken, e.g. wrong S3 credentials) but a tiny artifact written, read back and deleted
through the server, within the bounded client retries (:class:`~ultraflux_core.tracking.client.HttpClientConfig`).
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

from ultraflux_core.errors import UltraFluxError
from ultraflux_core.tracking.uri import check_tracking_reachable, client_for, experiment_id

EXPERIMENT = "ultraflux-readiness"  # holds the probe runs (each deleted after its check)
PROBE = "readiness/probe.txt"


def check_artifact_store(uri: str, timeout_s: float = 5.0) -> str:
    """Write, read back and delete a probe artifact through the tracking server at ``uri``; returns where it was
    written. Raises ``UltraFluxError`` saying which step failed and why (the server's answer)."""
    check_tracking_reachable(uri, timeout_s)
    client = client_for(uri)
    token = uuid.uuid4().hex
    step = "create a probe run"
    run_id = None
    try:
        run_id = client.create_run(experiment_id(client, EXPERIMENT, uri), run_name="readiness-probe").info.run_id
        step = "write a probe artifact"
        client.log_text(run_id, token, PROBE)
        step = "read the probe artifact back"
        with tempfile.TemporaryDirectory(prefix="ultraflux-probe-") as tmp:
            read = Path(client.download_artifacts(run_id, PROBE, tmp)).read_text()
        if read != token:
            raise UltraFluxError(f"the probe artifact read back from {uri} differs from what was written")
        step = "delete the probe artifact"
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        where = client.get_run(run_id).info.artifact_uri
        get_artifact_repository(where, tracking_uri=uri).delete_artifacts("readiness")
    except UltraFluxError:
        raise
    except Exception as err:  # MLflow and the artifact stores raise many types; the step and the answer matter
        message = str(getattr(err, "message", err)).splitlines()[0][:400]
        raise UltraFluxError(
            f"the artifact store behind {uri} is not usable: could not {step} ({message}). /health does not "
            "check it: see the tracking server's log (S3 credentials, bucket, --artifacts-destination)") from err
    finally:
        if run_id is not None:
            try:
                client.delete_run(run_id)
            except Exception:  # noqa: S110 - the check's own result matters more than tidying up
                pass
    return f"{where}/readiness"
