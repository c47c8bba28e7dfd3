"""Adapters in the registry and the served model: an adapter registered as a model version naming its base release
(refused for another base), a release served with adapters it lists at load (one by folder, one by registry URI),
requests naming one by name and scale through the one request guard."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.config import GenerateConfig, ServeConfig
from ultraflux_model.release.fetch import CACHE_ENV
from ultraflux_model.serving.publish import log_release, register_adapter
from ultraflux_model.serving.pyfunc import serving_config

from tests.model.lora.conftest import make_adapter


@pytest.fixture(scope="module")
def registry(tiny_checkpoint, tiny_adapter, tiny_adapter_b, tmp_path_factory):
    """A SQLite store with the tiny release as ``ultraflux`` v1 and ``tiny_adapter_b`` registered against it; the
    release logged again with two adapters (a folder and the registered version)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("lora-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv(CACHE_ENV, str(root / "cache"))
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = client.create_experiment("lora", artifact_location=(root / "artifacts").as_uri())
        run_id = client.create_run(experiment).info.run_id
        base = log_release(tiny_checkpoint, uri, run_id)
        client.create_registered_model("ultraflux")
        client.create_model_version("ultraflux", source=client.get_logged_model(base.model_id).artifact_location,
                                    run_id=run_id, model_id=base.model_id)  # fmt: skip
        client.set_registered_model_alias("ultraflux", "champion", "1")
        version = register_adapter(tiny_adapter_b, uri, run_id, "models:/ultraflux@champion")
        gen = GenerateConfig(sizes=((64, 64),), steps=2, dtype="fp32")
        lora = {"style-a": str(tiny_adapter), "style-b": f"models:/ultraflux-lora/{version}"}
        served = log_release(tiny_checkpoint, uri, run_id, serving_config(gen, ServeConfig(max_images=4), lora))
        yield {"uri": uri, "client": client, "run_id": run_id, "version": version, "served": served.model_uri,
               "root": root}  # fmt: skip


def test_registered_adapter_names_its_base_release(registry, tiny_adapter_b):
    version = registry["client"].get_model_version("ultraflux-lora", registry["version"])
    assert version.tags["ultraflux.base_model"] == "ultraflux" and version.tags["ultraflux.base_version"] == "1"
    assert version.tags["ultraflux.base_uri"] == "models:/ultraflux/1" and version.tags["ultraflux.kind"] == "lora"
    described = version.description
    assert "for ultraflux version 1 (models:/ultraflux/1, requested as models:/ultraflux@champion)" in described
    assert "style-b (rank 2, alpha 2, targets all_linear)" in version.description


def test_an_adapter_of_another_base_is_not_registered(registry, tiny_checkpoint, tmp_path):
    other = make_adapter(tiny_checkpoint, tmp_path / "other", base_fingerprint="f" * 64)
    with pytest.raises(UltraFluxError, match="not on this model"):
        register_adapter(other, registry["uri"], registry["run_id"], "models:/ultraflux@champion")
    names = [str(v.version) for v in registry["client"].search_model_versions("name='ultraflux-lora'")]
    assert names == [registry["version"]]  # nothing registered


def _images(frame: pd.DataFrame) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).astype(np.int16) for b64 in frame["image"]]


def test_served_model_applies_the_named_adapter_and_refuses_others(registry):
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", registry["uri"])
        mp.setenv(CACHE_ENV, str(registry["root"] / "cache"))
        model = mlflow.pyfunc.load_model(registry["served"])
        row = {"prompt": "a fox", "seed": 4}
        rows = [row, {**row, "lora": "style-a"}, {**row, "lora": "style-a", "lora_scale": 0.0},
                {**row, "lora": "style-b", "lora_scale": 0.5}]
        out = model.predict(pd.DataFrame(rows))
        plain, a, a_zero, b = _images(out)
        assert np.abs(a - plain).max() > 10 and np.array_equal(a_zero, plain) and np.abs(b - plain).max() > 10
        meta = [json.loads(m) for m in out["metadata"]]
        assert "lora" not in meta[0] and [(r["name"], r["scale"]) for r in meta[3]["lora"]] == [("style-b", 0.5)]
        for bad, message in ((("lora", "/etc/passwd"), "unknown LoRA adapter: choose one of the 2 this server lists "
                              "(style-a, style-b)"), (("lora_scale", 9.0), "lora_scale must lie between -4 and 4")):
            with pytest.raises(MlflowException) as err:
                model.predict(pd.DataFrame([{**row, "lora": "style-a", bad[0]: bad[1]}]))
            assert err.value.error_code == "INVALID_PARAMETER_VALUE"
            assert err.value.message == f"row 0: {message}" + ("" if bad[0] == "lora" else ", got 9")
            assert "/etc" not in err.value.message
