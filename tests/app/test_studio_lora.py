"""The Studio's LoRA picker: adapters offered by name (never a path), the scale reaching the image, the main model
only, an adapter of another model refused when the model loads; the page's API through gradio_client."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.app.engine import Request, Studio

from tests.app.conftest import free_port
from tests.model.lora.conftest import make_adapter


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint, tmp_path_factory):
    return make_adapter(tiny_checkpoint, tmp_path_factory.mktemp("studio-lora") / "film-look")


@pytest.fixture(scope="module")
def studio(tiny_checkpoint, adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("studio-lora-out")
    return Studio(str(tiny_checkpoint), out=out, device="cpu", lora=[str(adapter)])


def _pixels(made) -> np.ndarray:
    return np.asarray(Image.open(made[0].path)).astype(np.int16)


def test_picker_applies_the_named_adapter_at_its_scale(studio):
    assert studio.lora_choices == ["film-look"]
    request = Request("a red fox", 64, 64, steps=2, seed=1)
    plain = _pixels(studio.generate(request))
    styled = studio.generate(Request(**{**request.__dict__, "lora": "film-look", "lora_scale": 1.5}))
    assert np.abs(_pixels(styled) - plain).max() > 10
    assert [(r["name"], r["scale"]) for r in styled[0].sidecar["lora"]] == [("film-look", 1.5)]
    assert np.array_equal(_pixels(studio.generate(request)), plain)  # the next request without it: the base model
    with pytest.raises(UltraFluxError, match=r"unknown LoRA adapter: choose one of the 1 this server lists"):
        studio.check(Request(**{**request.__dict__, "lora": "/etc/passwd"}))
    with pytest.raises(UltraFluxError, match="lora_scale must lie between -4 and 4"):
        studio.check(Request(**{**request.__dict__, "lora": "film-look", "lora_scale": 5.0}))


def test_an_adapter_of_another_model_fails_when_the_model_loads(tiny_checkpoint, tmp_path):
    other = make_adapter(tiny_checkpoint, tmp_path / "other", base_fingerprint="a" * 64)
    app = Studio(str(tiny_checkpoint), out=tmp_path / "o", device="cpu", lora=[str(other)])
    with pytest.raises(UltraFluxError, match="other was trained on"):
        app.load()


def test_generate_lora_endpoint_through_gradio_client(studio):
    from gradio_client import Client
    from ultraflux_model.app.studio import build_app, theme

    demo = build_app(studio, default_steps=2)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False, theme=theme(),
                allowed_paths=[str(studio.out.resolve())])  # fmt: skip
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=True)
        _, plain = client.predict("a fox", 64, 64, 2, 4.0, 3, api_name="/generate")
        image, meta = client.predict("a fox", 64, 64, 2, 4.0, 3, "film-look", 0.5, api_name="/generate_lora")
        assert "lora" not in plain and [(r["name"], r["scale"]) for r in meta["lora"]] == [("film-look", 0.5)]
        assert Image.open(image).size == (64, 64)
    finally:
        demo.close()
