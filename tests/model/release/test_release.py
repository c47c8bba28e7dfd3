"""Releases in the MLflow artifact store (SQLite store, local artifacts): content-addressed blobs, the pyfunc
flavor, and ``resolve_checkpoint`` of registry URIs through the download cache.

The same code against a real ``mlflow server`` with an S3 artifact store: tests/flows/test_registry_server.py.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from ultraflux_core.errors import UltraFluxError
from ultraflux_model import UltraFluxTransformer2DModel
from ultraflux_model.checkpoint.layout import assemble_checkpoint, fingerprint
from ultraflux_model.checkpoint.resolve import HUB_PATTERNS, resolve_checkpoint
from ultraflux_model.config import GenerateConfig, ServeConfig
from ultraflux_model.release.fetch import CACHE_ENV, fetch_release
from ultraflux_model.release.manifest import BLOBS_DIR, Manifest
from ultraflux_model.serving.publish import log_release
from ultraflux_model.serving.pyfunc import parse_requests, serving_config

TAGS = {"git_sha": "abc", "dvc_data_hash": "none", "config_hash": "0"}


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A SQLite tracking store with one experiment whose artifacts live under ``tmp_path/artifacts``."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("releases", artifact_location=(tmp_path / "artifacts").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return uri, client, experiment


def _changed_transformer(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    trained = UltraFluxTransformer2DModel.from_pretrained(tiny_checkpoint / "transformer")
    with torch.no_grad():
        trained.proj_out.bias.add_(1.0)
    trained.save_pretrained(tmp_path / "export")
    return assemble_checkpoint(tiny_checkpoint, tmp_path / "release-2", {"transformer": tmp_path / "export"})


def test_second_release_uploads_only_the_changed_blobs_and_fetches_once(tiny_checkpoint, tmp_path, store):
    from ultraflux_core.tracking.registry import register_checkpoint

    uri, client, experiment = store
    first = log_release(tiny_checkpoint, uri, client.create_run(experiment).info.run_id)
    first_hashes = {sha for sha, _ in first.manifest.files.values()}
    assert sorted(first.uploaded) == sorted(first_hashes)  # an empty store receives every distinct file once
    blobs = tmp_path / "artifacts" / BLOBS_DIR
    assert sorted(p.name for p in blobs.iterdir()) == sorted(first_hashes)

    release = _changed_transformer(tiny_checkpoint, tmp_path)
    run = client.create_run(experiment).info.run_id
    second = log_release(release, uri, run)
    changed = {rel for rel, (sha, _) in second.manifest.files.items() if sha not in first_hashes}
    assert "transformer/diffusion_pytorch_model.safetensors" in changed
    assert all(rel.startswith("transformer/") for rel in changed)  # the VAE, text encoders, tokenizers: unchanged
    assert sorted(second.uploaded) == sorted({second.manifest.files[rel][0] for rel in changed})
    assert len(list(blobs.iterdir())) == len(first_hashes) + len(second.uploaded)
    assert second.manifest.content_hash != first.manifest.content_hash

    # the logged model is a small MLflow model (manifest, no weights) linked to the run
    model_dir = Path(client.get_logged_model(second.model_id).artifact_location.removeprefix("file://"))
    assert Manifest.read(model_dir / "artifacts" / "manifest.json") == second.manifest
    assert not list(model_dir.rglob("*.safetensors"))
    assert client.get_logged_model(second.model_id).source_run_id == run

    version = register_checkpoint(uri, "ultraflux", second.model_uri, {**TAGS, "eval_run_id": run})
    client.set_registered_model_alias("ultraflux", "champion", version)
    local = resolve_checkpoint("models:/ultraflux@champion")
    assert local == tmp_path / "cache" / second.manifest.content_hash
    assert fingerprint(local) == fingerprint(release)  # byte-identical checkpoint
    # concurrent fetches into an empty cache: one complete directory, no temporary leftovers
    shared = tmp_path / "cache-shared"
    with ThreadPoolExecutor(3) as pool:
        fetched = set(pool.map(lambda _: fetch_release("models:/ultraflux@champion", shared), range(3)))
    assert fetched == {shared / second.manifest.content_hash}
    assert sorted(p.name for p in shared.iterdir() if p.is_dir()) == [second.manifest.content_hash]
    assert fingerprint(shared / second.manifest.content_hash) == fingerprint(release)
    # the cache answers the next fetch: with the blob store gone, the same URI still resolves to the same dir ...
    shutil.rmtree(blobs)
    assert resolve_checkpoint(f"models:/ultraflux/{version}") == local
    assert resolve_checkpoint(f"runs:/{run}/ultraflux") == local  # the run's logged model, by name
    assert resolve_checkpoint(second.model_uri) == local  # models:/<model_id>
    # ... while a fresh cache has to download, and says clearly that it cannot
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path / "cache-2"))
        with pytest.raises(UltraFluxError, match="cannot download blob"):
            resolve_checkpoint("models:/ultraflux@champion")
    assert not (tmp_path / "cache-2" / second.manifest.content_hash).exists()  # nothing half-written
    with pytest.raises(UltraFluxError, match="cannot resolve models:/ultraflux@nobody"):
        resolve_checkpoint("models:/ultraflux@nobody")


def test_requests_take_the_release_defaults_and_respect_the_ceilings():
    config = serving_config(GenerateConfig(sizes=((64, 96),), steps=3, seed=5),
                            ServeConfig(max_pixels=96 * 96, max_images=3))
    frame = pd.DataFrame({"prompt": ["a", "b"], "width": [96, None], "seed": [7, None], "cache": ["first_block", None]})
    assert parse_requests(frame, config) == [
        {"prompt": "a", "width": 96, "height": 96, "steps": 3, "guidance": 4.0, "seed": 7, "lora": None,
         "lora_scale": 1.0, "cache": "first_block"},
        # seed + row, as generate; the cache of the release's generate.accel
        {"prompt": "b", "width": 64, "height": 96, "steps": 3, "guidance": 4.0, "seed": 6, "lora": None,
         "lora_scale": 1.0, "cache": "none"},
    ]
    with pytest.raises(UltraFluxError, match=r"row 0: cache must be one of \['none', 'first_block', 'taylorseer'\]"):
        parse_requests(pd.DataFrame({"prompt": ["a"], "cache": ["fast"]}), config)
    with pytest.raises(UltraFluxError, match="over the limit"):
        parse_requests(pd.DataFrame({"prompt": ["a"], "width": [128], "height": [128]}), config)
    with pytest.raises(UltraFluxError, match="4 images per request exceeds the limit of 3"):
        parse_requests(pd.DataFrame({"prompt": list("abcd")}), config)
    with pytest.raises(UltraFluxError, match="multiples of 32"):
        parse_requests(pd.DataFrame({"prompt": ["a"], "width": [50]}), config)
    with pytest.raises(UltraFluxError, match="unknown request columns"):
        parse_requests(pd.DataFrame({"prompt": ["a"], "cfg": [1]}), config)


def test_pyfunc_model_generates_pngs_from_the_registry(tiny_checkpoint, store):
    import mlflow.pyfunc

    uri, client, experiment = store
    gen = GenerateConfig(sizes=((64, 64),), steps=2, dtype="fp32")
    logged = log_release(tiny_checkpoint, uri, client.create_run(experiment).info.run_id,
                         serving_config(gen, ServeConfig(max_pixels=96 * 64, max_images=2)))
    model = mlflow.pyfunc.load_model(logged.model_uri)
    inputs = model.metadata.get_input_schema()
    assert [c.name for c in inputs.inputs if c.required] == ["prompt"]
    example = model.metadata.load_input_example(mlflow.artifacts.download_artifacts(logged.model_uri))
    assert len(example) == 2 and example["width"].tolist() == [64, 64]  # batch > 1: no frozen batch size
    out = model.predict(pd.DataFrame({"prompt": ["a red fox", "a lighthouse"], "width": [96, 64], "seed": [3, 4]}))
    assert list(out.columns) == ["image", "width", "height", "seed", "metadata"]
    sizes = [Image.open(io.BytesIO(base64.b64decode(b64))).size for b64 in out["image"]]
    assert sizes == [(96, 64), (64, 64)]
    meta = json.loads(out["metadata"][0])
    assert (meta["steps"], meta["seed"], meta["prompt"]) == (2, 3, "a red fox")
    assert meta["model_hash"] == fingerprint(tiny_checkpoint)
    with pytest.raises(Exception, match="over the limit"):
        model.predict(pd.DataFrame({"prompt": ["too big"], "width": [128], "height": [128]}))


def test_hub_snapshot_takes_the_diffusers_layout_only():
    """FLUX.1-dev's repo (file list as published): the diffusers components are fetched; the root-level original
    checkpoints (23.8 GB flux1-dev.safetensors, ae.safetensors), pickles and images are not."""
    from huggingface_hub.utils import filter_repo_objects

    shards = [f"transformer/diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    wanted = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
              "text_encoder/model.safetensors", "text_encoder_2/config.json",
              "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors",
              "text_encoder_2/model.safetensors.index.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
              "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "tokenizer_2/special_tokens_map.json",
              "tokenizer_2/spiece.model", "tokenizer_2/tokenizer.json", "tokenizer_2/tokenizer_config.json",
              "transformer/config.json", *shards, "transformer/diffusion_pytorch_model.safetensors.index.json",
              "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    unwanted = ["flux1-dev.safetensors", "ae.safetensors", "README.md", "LICENSE.md", "dev_grid.jpg", ".gitattributes",
                "text_encoder/pytorch_model.bin", "vae/diffusion_pytorch_model.bin"]
    assert sorted(filter_repo_objects(wanted + unwanted, allow_patterns=list(HUB_PATTERNS))) == sorted(wanted)
