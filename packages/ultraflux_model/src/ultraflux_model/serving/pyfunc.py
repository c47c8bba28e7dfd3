"""The pyfunc flavor of a release: a table of requests in, PNG images (base64) and their sidecars out.

Input columns (only ``prompt`` required; a missing column or an empty cell takes the release's default, which
is the ``generate`` section it was released with, as ``ultraflux generate`` would use; row ``k`` without a seed
uses ``seed + k``, as ``ultraflux generate`` numbers its images)::

    prompt: str   width: int   height: int   steps: int   guidance: float   seed: int

Output columns: ``image`` (PNG bytes, base64), ``width``, ``height``, ``seed``, ``metadata`` (the JSON sidecar
``ultraflux generate`` writes beside each PNG). Every request is checked against the release's ceilings
(``max_pixels`` per image, ``max_images`` rows) before anything is generated.
"""

from __future__ import annotations

import base64
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.pyfunc import PythonModel
from ultraflux_core.errors import UltraFluxError

from ultraflux_model.config import GenerateConfig, ServeConfig
from ultraflux_model.inference.limits import check_request

OPTIONAL_COLUMNS: dict[str, type] = {"width": int, "height": int, "steps": int, "guidance": float, "seed": int}
OUTPUT_COLUMNS = ("image", "width", "height", "seed", "metadata")


def serving_config(generate: GenerateConfig | None = None, serve: ServeConfig | None = None) -> dict[str, Any]:
    """The served model's ``model_config``: request defaults and fixed settings from ``generate``, ceilings from
    ``serve`` (the same ``serve`` section the web app enforces)."""
    gen, limits = generate or GenerateConfig(), serve or ServeConfig()
    width, height = gen.sizes[0]
    return {
        "width": width, "height": height, "steps": gen.steps, "guidance": gen.guidance, "seed": gen.seed,
        "shift": gen.shift, "max_sequence_length": gen.max_sequence_length, "dtype": gen.dtype,
        "vae_decode": gen.vae_decode, "max_pixels": limits.max_pixels, "max_images": limits.max_images,
    }


def signature():  # noqa: ANN201 - mlflow ModelSignature
    """Input: ``prompt`` (required) and the optional request columns; output: the image table."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    kinds = {int: "long", float: "double"}
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
         "guidance": float(config["guidance"]), "seed": config["seed"] + k}
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
    value = row.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    kind = OPTIONAL_COLUMNS[name]
    if kind is int and float(value) != int(value):
        raise UltraFluxError(f"column {name} must be a whole number, got {value!r}")
    return kind(value)


def parse_requests(frame: pd.DataFrame, config: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per row with every field filled; ``UltraFluxError`` for a bad table or a request over the limits."""
    if "prompt" not in frame.columns:
        raise UltraFluxError(f"requests need a 'prompt' column; got columns {list(frame.columns)}")
    unknown = sorted(set(frame.columns) - {"prompt", *OPTIONAL_COLUMNS})
    if unknown:
        raise UltraFluxError(f"unknown request columns {unknown}; known: prompt, {', '.join(OPTIONAL_COLUMNS)}")
    requests = []
    for k, (_, row) in enumerate(frame.iterrows()):
        prompt = row["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise UltraFluxError(f"row {k}: prompt must be a non-empty string")
        request = {"prompt": prompt}
        for name in OPTIONAL_COLUMNS:
            default = config[name] + k if name == "seed" else config[name]
            request[name] = _cell(row, name, default)
        if request["steps"] < 1:
            raise UltraFluxError(f"row {k}: steps must be at least 1")
        check_request(ServeConfig(max_pixels=config["max_pixels"], max_images=config["max_images"]),
                      [(request["width"], request["height"])], len(frame))
        requests.append(request)
    return requests


class UltraFluxPyfunc(PythonModel):
    """Loads the release's checkpoint once (through the content-addressed cache) and generates per request."""

    def load_context(self, context) -> None:  # noqa: ANN001 - mlflow PythonModelContext
        from ultraflux_model.inference.pipeline import load_pipeline
        from ultraflux_model.release.fetch import materialize
        from ultraflux_model.release.manifest import Manifest

        self.config = dict(context.model_config)
        self.root = materialize(Manifest.read(Path(context.artifacts["manifest"])))
        self.pipe = load_pipeline(self.root, dtype=self.config["dtype"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # noqa: ANN001
        from ultraflux_model.inference.pipeline import generate

        requests = parse_requests(pd.DataFrame(model_input), self.config)
        rows = []
        with tempfile.TemporaryDirectory(prefix="ultraflux-serve-") as tmp:
            for k, request in enumerate(requests):
                image = generate(
                    self.root, [request["prompt"]], [(request["width"], request["height"])],
                    steps=request["steps"], guidance=request["guidance"], seed=request["seed"],
                    shift=self.config["shift"], dtype=self.config["dtype"], vae_decode=self.config["vae_decode"],
                    max_sequence_length=self.config["max_sequence_length"], out_dir=Path(tmp) / str(k),
                    pipe=self.pipe, progress=False,
                )[0]
                rows.append({
                    "image": base64.b64encode(image.path.read_bytes()).decode("ascii"),
                    "width": image.width, "height": image.height, "seed": image.seed,
                    "metadata": json.dumps(image.sidecar, sort_keys=True),
                })
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
