"""Where MLflow lives and what a model URI names: the tracking URI of a run (one resolution for every package),
a fail-fast reachability check, a client bound to a URI, and the kinds of model URI (``models:/…``, ``runs:/…``)
with their resolution to a registry version or an artifact location.

Every call goes through an explicit ``MlflowClient`` bound to the URI it is given: MLflow's own resolution reads
the process-global tracking URI, which two stores in one process (training and evaluation, tests) would share.
``mlflow`` is imported inside the functions (the ``ultraflux-core[tracking]`` extra), so importing this is cheap.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from ultraflux_core.errors import UltraFluxError
from ultraflux_core.tracking.client import apply_client_settings

REGISTRY_SCHEMES = ("models:/", "runs:/")
# The demo's store (`make demo`, `make ui`, the MLflow UI command): the one default of every command that looks
# runs or models up without a tracking URI, relative to the working directory (the repository root after a demo).
DEMO_STORE = Path("artifacts/mlflow.db")
# the root ``tracking`` section's settings; a caller with its own section passes its own advice
DEFAULT_ADVICE = ("set tracking.uri or $MLFLOW_TRACKING_URI to a running server, or unset both to log into a local "
                  "SQLite file")


class TrackingUnavailable(UltraFluxError):
    """The tracking server did not answer (down, or failing) within the bounded retries."""


def transport_failure(err: BaseException) -> bool:
    """Whether an MLflow error means the server was not reached or kept failing (connection refused, timeouts,
    5xx after the retries), as opposed to an answer such as "no such model"."""
    text = str(getattr(err, "message", err))
    return ("API request to" in text and "failed with exception" in text) or "Max retries exceeded" in text


def unavailable(uri: str, err: BaseException) -> TrackingUnavailable:
    """The one-line error for a server that did not answer, naming the retry settings that bounded the wait."""
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    return TrackingUnavailable(
        f"MLflow tracking server {uri} did not answer after {int(retries) + 1} tries "
        f"(MLFLOW_HTTP_REQUEST_MAX_RETRIES={retries}): {str(getattr(err, 'message', err))[:300]}. Start it or "
        "fix MLFLOW_TRACKING_URI; the server's own log says why it failed (e.g. its S3 credentials)")


def resolve_tracking_uri(uri: str | None, default_store: Path | str) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI`` (read at call time), else ``sqlite:///<default_store>``.

    ``default_store`` is written as given: a relative path stays relative to the working directory.
    """
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{default_store}"


def default_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else the demo's store ``sqlite:///<cwd>/artifacts/mlflow.db``."""
    return resolve_tracking_uri(uri, DEMO_STORE.resolve())


def check_store_exists(uri: str, holds: str = "the model") -> None:
    """Refuse a lookup in a SQLite store that does not exist, before MLflow would create an empty one (a stray
    ``mlflow.db`` holding nothing); other stores are the server's business."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if str(path) not in ("", ":memory:") and not path.is_file():
            raise UltraFluxError(
                f"no MLflow store at {path}: run `make demo` first (it writes {DEMO_STORE}), or set "
                f"MLFLOW_TRACKING_URI (or tracking.uri) to the store or server that holds {holds}"
            )


def check_tracking_reachable(uri: str, timeout_s: float = 5.0, advice: str = DEFAULT_ADVICE) -> None:
    """Fail fast, before any heavy work, when the tracking store cannot be reached.

    http(s): a TCP connect to the server within ``timeout_s``. sqlite / file: the parent directory must exist
    (or be creatable). Raises ``UltraFluxError`` naming the URI, ending with ``advice`` (which settings to change).
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
                return
        except OSError as err:
            raise UltraFluxError(f"MLflow tracking server {uri} is unreachable ({err}); start it, or {advice}") from err
    if parsed.scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        if path is not None and str(path) not in ("", ":memory:"):
            try:
                path.resolve().parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UltraFluxError(
                    f"cannot create the folder of the MLflow SQLite store {uri}: {err}; {advice}") from err
        return
    if parsed.scheme in ("", "file"):
        root = Path(parsed.path if parsed.scheme == "file" else uri)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UltraFluxError(f"cannot create the MLflow file store {root}: {err}; {advice}") from err


def client_for(uri: str):
    """An ``MlflowClient`` bound to ``uri`` (tracking and registry), with bounded retries and proxied artifacts
    (:func:`apply_client_settings`)."""
    from mlflow.tracking import MlflowClient

    apply_client_settings()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def local_artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts go beside the database (``<db dir>/mlartifacts``), not into ``./mlruns``."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()


def experiment_id(client, name: str, uri: str) -> str:
    """The id of experiment ``name``, created (artifacts per :func:`local_artifact_location`) if it is new."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=local_artifact_location(uri))
    except Exception:  # another process created it concurrently: read it back
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def is_registry_uri(model: str | os.PathLike) -> bool:
    """``models:/…`` or ``runs:/…``: a model that lives in an MLflow tracking server / registry."""
    return str(model).startswith(REGISTRY_SCHEMES)


def logged_model_id(source: str) -> str | None:
    """``m-…`` of a ``models:/<model_id>`` URI (a logged model, not a registry name/version/alias)."""
    rest = str(source).removeprefix("models:/")
    return rest if rest != str(source) and rest.startswith("m-") and "/" not in rest else None


def is_registered_model_uri(model_uri: str) -> bool:
    """``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` (a registry entry), not ``models:/<model_id>`` or
    ``runs:/``."""
    return model_uri.startswith("models:/") and logged_model_id(model_uri) is None


def latest_version(uri: str, model_name: str) -> tuple[str, str]:
    """``(version, source)`` of the highest registered version of ``model_name``; ``UltraFluxError`` if none."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client_for(uri).search_model_versions(f"name='{model_name}'")
    except MlflowException as err:
        if transport_failure(err):
            raise unavailable(uri, err) from err
        raise UltraFluxError(f"cannot list versions of {model_name} at {uri}: {err.message}") from err
    if not versions:
        raise UltraFluxError(
            f"no registered versions of {model_name!r} at {uri}: register one (eval flow with model=...)")
    newest = max(versions, key=lambda v: int(v.version))
    return str(newest.version), str(newest.source)


def registered_version(uri: str, model_uri: str) -> tuple[str, str]:
    """``(model name, version)`` that ``models:/name@alias``, ``models:/name/<version>`` or ``models:/name/latest``
    names at ``uri``; ``UltraFluxError`` for anything else or a name/alias/version that does not exist."""
    from mlflow.exceptions import MlflowException

    rest = model_uri.removeprefix("models:/")
    if rest == model_uri or logged_model_id(model_uri) or not rest:
        raise UltraFluxError(f"{model_uri} is not a registered model URI (models:/NAME@ALIAS, models:/NAME/VERSION)")
    client = client_for(uri)
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
        name, _, version = rest.partition("/")
        if version == "latest":
            return name, latest_version(uri, name)[0]
        if not version.isdigit():
            raise UltraFluxError(
                f"{model_uri}: expected models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/latest")
        return name, str(client.get_model_version(name, version).version)
    except MlflowException as err:
        if transport_failure(err):
            raise unavailable(uri, err) from err
        raise UltraFluxError(f"{model_uri} does not resolve at {uri}: {err.message}") from err


def model_download_uri(uri: str, model_uri: str) -> str:
    """The artifact URI holding the files of ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
    ``models:/NAME/latest``, ``models:/<model_id>`` or ``runs:/<run_id>/<path>``, resolved at ``uri``.

    ``runs:/<run_id>/<name>`` names the run's logged model called ``name`` if it has one, else the run artifact
    at ``path``.
    """
    from mlflow.exceptions import MlflowException

    client = client_for(uri)
    model_id = logged_model_id(model_uri)
    try:
        if model_uri.startswith("runs:/"):
            run_id, _, path = model_uri.removeprefix("runs:/").partition("/")
            run = client.get_run(run_id)
            for output in (run.outputs.model_outputs if run.outputs else []):
                logged = client.get_logged_model(output.model_id)
                if logged.name == path.strip("/"):
                    return str(logged.artifact_location)
            return f"{run.info.artifact_uri.rstrip('/')}/{path.strip('/')}"
        if model_id is not None:
            return str(client.get_logged_model(model_id).artifact_location)
        name, version = registered_version(uri, model_uri)
        return str(client.get_model_version_download_uri(name, version))
    except MlflowException as err:
        if transport_failure(err):
            raise unavailable(uri, err) from err
        raise UltraFluxError(f"{model_uri} does not resolve at {uri}: {err.message}") from err
