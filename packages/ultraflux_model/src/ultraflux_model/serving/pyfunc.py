"""The pyfunc flavor of a release: a table of requests in, PNG images (base64) and their sidecars out.

Input columns (only ``prompt`` required; a missing column or an empty cell takes the release's default, which
is the ``generate`` section it was released with, as ``ultraflux generate`` would use; row ``k`` without a seed
uses ``seed + k``, as ``ultraflux generate`` numbers its images)::

    prompt: str   width: int   height: int   steps: int   guidance: float   seed: int   lora: str   lora_scale: float
    cache: str (none | first_block | taylorseer; thresholds are the release's generate.accel)

``lora`` names one of the LoRA adapters the release was logged with (``serving_config(lora={name: folder or
models:/ URI})``; loaded and checked against the release's transformer when the server starts, listed in every
refusal), never a path; ``lora_scale`` (default 1) is its weight, finite within ±4.

Output columns: ``image`` (PNG bytes, base64), ``width``, ``height``, ``seed``, ``metadata`` (the JSON sidecar
``ultraflux generate`` writes beside each PNG). Every request passes the one request guard
(``ultraflux_model.inference.limits``: steps up to the release's ``max_steps``, guidance finite in 0 … 30, seeds
0 … 2**63-1, ``max_pixels`` per image, ``max_images`` rows) before anything is generated. The release's
``generate.accel`` (compile, quantize) is applied once at load; the cache can change per row.

Errors: a refused request (any ``UltraFluxError``) becomes MLflow's ``INVALID_PARAMETER_VALUE`` (HTTP 400) with the
one-line message and no stack trace; a request stopped by SIGTERM (the server shutting down) becomes
``TEMPORARILY_UNAVAILABLE`` (HTTP 503). The scoring server's request timeout (``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``,
60 s by default) must cover the slowest allowed request: docs/deploy.md gives the values for 4K.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow.pyfunc import PythonModel
from ultraflux_core.errors import UltraFluxError

from ultraflux_model.config import AccelConfig, CacheMode, GenerateConfig, ServeConfig
from ultraflux_model.inference.limits import check_lora, check_request, check_settings, whole_number
from ultraflux_model.inference.stop import Stopped

logger = logging.getLogger(__name__)

OPTIONAL_COLUMNS: dict[str, type] = {"width": int, "height": int, "steps": int, "guidance": float, "seed": int,
                                     "lora": str, "lora_scale": float, "cache": str}  # fmt: skip
OUTPUT_COLUMNS = ("image", "width", "height", "seed", "metadata")


def serving_config(generate: GenerateConfig | None = None, serve: ServeConfig | None = None,
                   lora: dict[str, str] | None = None) -> dict[str, Any]:
    """The served model's ``model_config``: request defaults and fixed settings from ``generate``, ceilings from
    ``serve`` (the same ``serve`` section the web app enforces), and the LoRA adapters requests may name
    (``{name: adapter folder or registry URI}``, loaded when the server starts)."""
    gen, limits = generate or GenerateConfig(), serve or ServeConfig()
    for name in lora or {}:
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise UltraFluxError(f"LoRA adapter name {name!r}: use letters, digits, '-', '_' and '.' only")
    width, height = gen.sizes[0]
    return {
        "width": width, "height": height, "steps": gen.steps, "guidance": gen.guidance, "seed": gen.seed,
        "shift": gen.shift, "max_sequence_length": gen.max_sequence_length, "dtype": gen.dtype,
        "vae_decode": gen.vae_decode, "max_pixels": limits.max_pixels, "max_images": limits.max_images,
        "max_steps": limits.max_steps, "lora": dict(lora or {}),
        "accel": gen.accel.model_dump(),
    }


def release_accel(config: dict[str, Any]) -> AccelConfig:
    """The accelerators of a release's ``model_config`` (releases logged before them: none)."""
    return AccelConfig(**config.get("accel", {}))


def serve_limits(config: dict[str, Any]) -> ServeConfig:
    """The ceilings of a release's ``model_config`` (releases logged before ``max_steps`` get today's default)."""
    return ServeConfig(max_pixels=config["max_pixels"], max_images=config["max_images"],
                       max_steps=config.get("max_steps", ServeConfig().max_steps))  # fmt: skip


def signature():  # noqa: ANN201 - mlflow ModelSignature
    """Input: ``prompt`` (required) and the optional request columns; output: the image table."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    kinds = {int: "long", float: "double", str: "string"}
    inputs = Schema([ColSpec("string", "prompt")] + [
        ColSpec(kinds[kind], name, required=False) for name, kind in OPTIONAL_COLUMNS.items()
    ])
    outputs = Schema([ColSpec("string", "image"), ColSpec("long", "width"), ColSpec("long", "height"),
                      ColSpec("long", "seed"), ColSpec("string", "metadata")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(config: dict[str, Any]) -> pd.DataFrame:
    """Two requests (a batch-1 example would freeze the served batch size), full columns in the defaults."""
    rows = [("a red fox in fresh snow, golden hour, 4k photograph", 0),
            ("a lighthouse on a cliff above a stormy sea, wide panorama", 1)]
    return pd.DataFrame([
        {"prompt": prompt, "width": config["width"], "height": config["height"], "steps": config["steps"],
         "guidance": float(config["guidance"]), "seed": config["seed"] + k, "cache": release_accel(config).cache}
        for prompt, k in rows
    ])


def save_pyfunc_model(path: Path, manifest: Path, config: dict[str, Any], mlflow_model) -> None:  # noqa: ANN001
    """Write the MLflow model directory: code entry, manifest artifact, config, signature, example."""
    import mlflow
    import mlflow.pyfunc

    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=str(Path(__file__).with_name("model_code.py")),
        artifacts={"manifest": str(manifest)},
        model_config=config,
        signature=signature(),
        input_example=input_example(config),
        mlflow_model=mlflow_model,
        # explicit: inferring requirements would load the model (download + build the pipeline) at save time
        pip_requirements=[f"mlflow=={mlflow.__version__}", "ultraflux-model"],
    )


def _cell(row: pd.Series, name: str, default: Any) -> Any:
    """The cell as sent (the guard checks its type and range), or ``default`` when it is missing or empty."""
    value = row.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return value.item() if hasattr(value, "item") else value  # numpy scalar -> Python number


def parse_requests(frame: pd.DataFrame, config: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per row with every field filled; ``UltraFluxError`` for a bad table or a request over the limits."""
    if "prompt" not in frame.columns:
        raise UltraFluxError(f"requests need a 'prompt' column; got columns {list(frame.columns)}")
    unknown = sorted(set(frame.columns) - {"prompt", *OPTIONAL_COLUMNS})
    if unknown:
        raise UltraFluxError(f"unknown request columns {unknown}; known: prompt, {', '.join(OPTIONAL_COLUMNS)}")
    limits = serve_limits(config)
    requests = []
    for k, (_, row) in enumerate(frame.iterrows()):
        prompt = row["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise UltraFluxError(f"row {k}: prompt must be a non-empty string")
        # seed + row, as ultraflux generate numbers its images; no adapter unless the row names one
        defaults = {**config, "seed": config["seed"] + k, "lora": None, "lora_scale": 1.0,
                    "cache": release_accel(config).cache}
        cells = {name: _cell(row, name, defaults[name]) for name in OPTIONAL_COLUMNS}
        try:
            size = (whole_number("width", cells["width"]), whole_number("height", cells["height"]))
            check_request(limits, [size], len(frame))
            settings = check_settings(limits, steps=cells["steps"], guidance=cells["guidance"], seed=cells["seed"],
                                      shift=config["shift"])  # fmt: skip
            lora, lora_scale = check_lora(config.get("lora", {}), cells["lora"], cells["lora_scale"])
            if cells["cache"] not in get_args(CacheMode):
                raise UltraFluxError(f"cache must be one of {list(get_args(CacheMode))}, got {cells['cache']!r}")
        except UltraFluxError as err:
            raise UltraFluxError(f"row {k}: {err}") from None
        requests.append({"prompt": prompt, "width": size[0], "height": size[1], "steps": settings.steps,
                         "guidance": settings.guidance, "seed": settings.seed, "lora": lora,
                         "lora_scale": lora_scale, "cache": cells["cache"]})  # fmt: skip
    return requests


class RequestError(MlflowException):
    """What the scoring server answers for an ``UltraFluxError``: the one-line message, no stack trace; 503
    (``TEMPORARILY_UNAVAILABLE``) for a request stopped by shutdown, 400 (``INVALID_PARAMETER_VALUE``) otherwise.

    The message stays that one line: the scoring server rewrites a predict error's message to
    ``"Failed to predict data '<the whole input table>'. Error: …"``, which buries it (and echoes every prompt).
    """

    def __init__(self, err: UltraFluxError) -> None:
        self._one_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        code = TEMPORARILY_UNAVAILABLE if isinstance(err, Stopped) else INVALID_PARAMETER_VALUE
        super().__init__(self._one_line, error_code=code)

    @property
    def message(self) -> str:  # type: ignore[override]
        return self._one_line

    @message.setter
    def message(self, _rewritten: str) -> None:
        pass  # keep the one line (see the class doc)


def _log_to_stderr() -> None:
    """Our request log in the server's output (uvicorn configures only its own loggers)."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s ultraflux %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def load_served_adapters(refs: dict[str, str], root: Path) -> dict[str, Any]:
    """``{name: Adapter}`` of a release's LoRA adapters, each a local folder or a registry URI (downloaded once per
    server start), read and checked against the release's transformer: a server never starts with an adapter of
    another model."""
    from ultraflux_model.lora.apply import base_fingerprints, check_base, read_adapter

    adapters = {}
    allowed = base_fingerprints(root) if refs else set()
    for name, ref in refs.items():
        folder = Path(ref)
        if "://" in ref or ref.startswith(("models:/", "runs:/")):
            import mlflow.artifacts

            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=tempfile.mkdtemp(
                prefix=f"ultraflux-lora-{name}-")))  # fmt: skip
        adapter = replace(read_adapter(folder), label=name)
        check_base(adapter, allowed)
        adapters[name] = adapter
    if adapters:
        logger.info("LoRA adapters: %s", ", ".join(adapters))
    return adapters


class UltraFluxPyfunc(PythonModel):
    """Loads the release's checkpoint once (through the content-addressed cache) and generates per request."""

    def load_context(self, context) -> None:  # noqa: ANN001 - mlflow PythonModelContext
        from ultraflux_model.inference.pipeline import load_pipeline
        from ultraflux_model.inference.stop import stop_on_sigterm
        from ultraflux_model.release.fetch import materialize
        from ultraflux_model.release.manifest import Manifest

        _log_to_stderr()
        # Under `mlflow models serve` this runs in uvicorn's main thread after uvicorn took SIGTERM: the request in
        # flight then stops at its next step instead of holding the shutdown until it is done.
        stop_on_sigterm()
        self.config = dict(context.model_config)
        self.root = materialize(Manifest.read(Path(context.artifacts["manifest"])))
        self.pipe = load_pipeline(self.root, dtype=self.config["dtype"], accel=release_accel(self.config))
        self.adapters = load_served_adapters(self.config.get("lora", {}), self.root)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # noqa: ANN001
        try:
            return self._predict(pd.DataFrame(model_input))
        except UltraFluxError as err:
            logger.warning("refused: %s", err)
            raise RequestError(err) from None

    def _predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        return predict_requests(self.pipe, self.root, self.config, parse_requests(frame, self.config),
                                adapters=self.adapters)


# ``callback(row, phase, done, total)``: ``generate``'s step callback tagged with the request row (progress of a job,
# cancellation: an exception it raises stops generation at that step).
RowCallback = Callable[[int, str, int, int], None]


def predict_requests(pipe, root: Path, config: dict[str, Any], requests: list[dict[str, Any]],  # noqa: ANN001
                     callback: RowCallback | None = None,
                     adapters: dict[str, Any] | None = None) -> pd.DataFrame:  # fmt: skip
    """The output table for :func:`parse_requests`' rows, generated one by one with the loaded ``pipe`` (the pyfunc
    model and the Ray Serve replicas share it, so both answer the same bytes); ``adapters`` are the server's LoRA
    adapters by name (:func:`load_served_adapters`), which a row's ``lora`` names."""
    from ultraflux_model.inference.pipeline import generate

    limits, accel = serve_limits(config), release_accel(config)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ultraflux-serve-") as tmp:
        for k, request in enumerate(requests):
            logger.info("row %d of %d: %dx%d, %d steps", k + 1, len(requests), request["width"], request["height"],
                        request["steps"])  # fmt: skip
            image = generate(
                root, [request["prompt"]], [(request["width"], request["height"])],
                steps=request["steps"], guidance=request["guidance"], seed=request["seed"],
                shift=config["shift"], dtype=config["dtype"], vae_decode=config["vae_decode"],
                max_sequence_length=config["max_sequence_length"], out_dir=Path(tmp) / str(k),
                pipe=pipe, progress=False, limits=limits,
                callback=None if callback is None else functools.partial(callback, k),
                lora=[((adapters or {})[request["lora"]], request["lora_scale"])] if request["lora"] else [],
                accel=accel.model_copy(update={"cache": request["cache"]}),
            )[0]
            rows.append({
                "image": base64.b64encode(image.path.read_bytes()).decode("ascii"),
                "width": image.width, "height": image.height, "seed": image.seed,
                "metadata": json.dumps(image.sidecar, sort_keys=True),
            })
    return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
