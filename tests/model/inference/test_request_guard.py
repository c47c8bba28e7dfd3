"""The one request guard, attacked at each entry point without a server (issue: serving hardening), and every
generation setting that passes it reaching the image. The served model and the web app: tests/model/release/
test_serving.py and tests/app/test_studio_api.py."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner
from ultraflux.cli import app
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.config import MAX_SEED, GenerateConfig, ServeConfig
from ultraflux_model.inference.limits import Settings, check_settings
from ultraflux_model.inference.pipeline import generate, generate_from_config, load_pipeline
from ultraflux_model.inference.stop import STOP, Stopped

# (settings, message): each is an attack from the issue or its neighbour; the message names parameter and range.
ATTACKS = [
    ({"steps": 10**9}, "steps must be between 1 and 200"),
    ({"steps": 0}, "steps must be between 1 and 200"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"steps": True}, "steps must be a whole number"),
    ({"guidance": float("inf")}, "guidance must be a finite number"),
    ({"guidance": float("nan")}, "guidance must be a finite number"),
    ({"guidance": -1.0}, "guidance must be between 0 and 30"),
    ({"guidance": 30.5}, "guidance must be between 0 and 30"),
    ({"seed": 2**63}, "seed must lie between 0 and 2\\*\\*63-1"),
    ({"seed": -1}, "seed must lie between 0 and 2\\*\\*63-1"),
    ({"seed": float("inf")}, "seed must be a whole number"),
    ({"seed": MAX_SEED, "images": 2}, "seeds 9223372036854775807 … 9223372036854775808"),
    ({"shift": float("inf")}, "shift must be a finite number"),
    ({"shift": 0.0}, "shift must be a positive number"),
]
OK = {"steps": 50, "guidance": 4.0, "seed": 0, "shift": 3.0}


@pytest.mark.parametrize("attack,message", ATTACKS, ids=lambda v: str(v)[:40])
def test_guard_refuses_with_the_parameter_and_its_range(attack, message):
    with pytest.raises(UltraFluxError, match=message):
        check_settings(ServeConfig(), **{**OK, **attack})


def test_guard_accepts_the_bounds_and_returns_plain_numbers():
    assert check_settings(ServeConfig(), steps=np.int64(200), guidance=30, seed=MAX_SEED, shift=3) == Settings(
        steps=200, guidance=30.0, seed=MAX_SEED, shift=3.0
    )
    assert type(check_settings(ServeConfig(), steps=3.0, guidance=0, seed=0).steps) is int
    assert check_settings(ServeConfig(max_steps=1000), steps=1000, guidance=4.0, seed=0).steps == 1000


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return load_pipeline(tiny_checkpoint, dtype="fp32", device="cpu")


@pytest.mark.parametrize("attack,message", ATTACKS[:1] + ATTACKS[4:5] + ATTACKS[8:9], ids=["steps", "guidance", "seed"])
def test_generate_refuses_before_loading_anything(tmp_path, attack, message):
    """The library entry point every front-end ends in: refused before the model loads (it does not exist here)."""
    with pytest.raises(UltraFluxError, match=message):
        generate(tmp_path / "no-model", ["a fox"], [(32, 32)], **{**OK, **attack}, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args,message",
    [(["--steps", str(10**9)], "steps must be between 1 and 200"),
     (["--guidance", "inf"], "guidance"),
     (["--seed", str(2**63)], "seed"),
     (["--steps", "300", "--set", "serve.max_steps=250"], "steps must be between 1 and 250")],
    ids=["steps", "guidance", "seed", "serve.max_steps"],
)  # fmt: skip
def test_cli_generate_refuses_the_attacks(tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "no-model"), "-p", "x", "--width", "32",
                                      "--height", "32", "--out", str(out), *args])  # fmt: skip
    assert result.exit_code != 0
    assert message in f"{result.output}{result.exception}"
    assert not out.exists()  # refused before anything was loaded or written


BASE = GenerateConfig(prompts=("a red fox in fresh snow at dusk",), sizes=((64, 64),), steps=2, dtype="fp32")
# Every generation knob of GenerateConfig (offload needs a GPU, transformer is another checkpoint: elsewhere).
CHANGES = {
    "steps": {"steps": 3},
    "guidance": {"guidance": 1.0},
    "seed": {"seed": 1},
    "size": {"sizes": ((96, 64),)},
    "shift": {"shift": 1.0},
    "vae_decode": {"vae_decode": "official"},
    "max_sequence_length": {"max_sequence_length": 4},
    "prompt": {"prompts": ("a lighthouse on a cliff",)},
    "dtype": {"dtype": "bf16"},
}


@pytest.fixture(scope="module")
def base_image(pipe, tiny_checkpoint, tmp_path_factory):
    cfg = BASE.model_copy(update={"model": str(tiny_checkpoint), "out": tmp_path_factory.mktemp("base")})
    return np.asarray(Image.open(generate_from_config(cfg, pipe=pipe, progress=False)[0].path))


@pytest.mark.parametrize("setting", list(CHANGES))
def test_each_setting_reaches_the_image(pipe, tiny_checkpoint, tmp_path, base_image, setting):
    cfg = BASE.model_copy(update={"model": str(tiny_checkpoint), "out": tmp_path, **CHANGES[setting]})
    # dtype is how the weights are loaded: the CLI loads the pipeline itself, so does this case
    made = generate_from_config(cfg, progress=False, device="cpu", **({} if setting == "dtype" else {"pipe": pipe}))[0]
    image = np.asarray(Image.open(made.path))
    assert image.shape != base_image.shape or not np.array_equal(image, base_image), setting


def test_stop_flag_ends_sampling_at_the_next_step_and_writes_nothing(pipe, tiny_checkpoint, tmp_path):
    seen = []
    STOP.set()
    try:
        with pytest.raises(Stopped, match="stopped after step 1 of 200"):
            generate(tiny_checkpoint, ["a fox"], [(32, 32)], steps=200, dtype="fp32", pipe=pipe, progress=False,
                     out_dir=tmp_path, callback=lambda *a: seen.append(a))  # fmt: skip
    finally:
        STOP.clear()
    assert seen == [] and not list(tmp_path.glob("*.png"))


def test_a_prompt_over_the_t5_limit_gets_a_notice(pipe, tiny_checkpoint, tmp_path, caplog):
    long_prompt = "a red fox in fresh snow, golden hour, " * 60
    with caplog.at_level(logging.WARNING, logger="ultraflux_model.inference.pipeline"):
        long, short = generate(tiny_checkpoint, [long_prompt, "a fox"], [(32, 32)], steps=1, dtype="fp32", pipe=pipe,
                               progress=False, out_dir=tmp_path)  # fmt: skip
    assert "T5 tokens; only the first 512 are used" in long.sidecar["notice"]
    assert "notice" not in short.sidecar
    assert [r.getMessage() for r in caplog.records] == [long.sidecar["notice"]]  # a warning, not an error


def test_sigterm_handler_sets_the_flag_and_still_runs_the_one_it_replaced():
    import signal

    from ultraflux_model.inference.stop import stop_on_sigterm, stop_requested

    seen = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # e.g. uvicorn's
    try:
        assert stop_on_sigterm() and stop_on_sigterm()  # idempotent: one chain, not two
        assert not stop_requested()
        signal.raise_signal(signal.SIGTERM)
        assert stop_requested() and seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, original)
        STOP.clear()
