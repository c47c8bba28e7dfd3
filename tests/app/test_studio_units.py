"""The app's pieces without a server: request limits, presets from the bucket table, errors, progress, cancel."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from ultraflux.config import UltraFluxConfig
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.app.engine import Cancelled, Request, Studio, friendly_error, list_outputs
from ultraflux_model.app.sizes import ASPECTS, FAMILIES, preset_size, size_note
from ultraflux_model.buckets import BUCKETS, BUCKETS_4K
from ultraflux_model.config import MAX_4K_BUCKET_PIXELS, ServeConfig
from ultraflux_model.inference.limits import check_request

from tests.app.conftest import free_port


def test_default_pixel_ceiling_is_the_largest_4k_bucket():
    assert MAX_4K_BUCKET_PIXELS == max(b.width * b.height for b in BUCKETS_4K) == 6144 * 2752
    assert UltraFluxConfig().serve == ServeConfig(max_pixels=MAX_4K_BUCKET_PIXELS, max_images=4)


def test_check_request_guards_count_size_and_pixels():
    limits = ServeConfig(max_pixels=512 * 512, max_images=2)
    check_request(limits, [(512, 512), (1024, 256)], images=2)  # at the limits: fine
    with pytest.raises(UltraFluxError, match="3 images per request exceeds the limit of 2"):
        check_request(limits, [(64, 64)], images=3)
    with pytest.raises(UltraFluxError, match="at least 1 image"):
        check_request(limits, [(64, 64)], images=0)
    with pytest.raises(UltraFluxError, match="nearest valid size is 512x512"):
        check_request(limits, [(500, 512)])
    with pytest.raises(UltraFluxError, match="over the limit of 0.3 MP"):
        check_request(limits, [(544, 512)])
    check_request(UltraFluxConfig().serve, [(b.width, b.height) for b in BUCKETS_4K], images=4)  # every 4K bucket


@pytest.mark.parametrize(
    "aspect,family,size",
    [("1:1", "1K", (1024, 1024)), ("16:9", "4K", (5440, 3072)), ("9:16", "2K", (1536, 2720)),
     ("2:1", "4K", (5760, 2880)), ("1:2", "1K", (704, 1440)), ("2.39:1", "4K", (6336, 2624))],
)  # fmt: skip
def test_presets_are_buckets_of_the_one_table(aspect, family, size):
    assert preset_size(aspect, family) == size


def test_every_preset_is_a_bucket_with_the_nearest_aspect():
    import math

    for family, key in FAMILIES.items():
        for aspect, (w, h) in ASPECTS.items():
            got = preset_size(aspect, family)
            assert got in BUCKETS[key]
            err = abs(math.log(got[0] / got[1]) - math.log(w / h))
            assert all(err <= abs(math.log(b.aspect) - math.log(w / h)) for b in BUCKETS[key])


def test_size_note_names_the_nearest_valid_size():
    assert "Nearest valid size: **1024×992**" in size_note(1020, 1000, 10**8)
    assert size_note(1024, 1024, 10**8).startswith("✓ 1024×1024")
    assert "over this server's limit" in size_note(8192, 8192, MAX_4K_BUCKET_PIXELS)


def test_friendly_errors_are_one_line_and_say_what_to_change():
    oom = friendly_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB\nmore"))
    assert "offload" in oom and "tiled" in oom and "\n" not in oom
    assert friendly_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried")).startswith("out of memory")
    assert friendly_error(UltraFluxError("checkpoint x does not exist")) == "checkpoint x does not exist"
    assert friendly_error(KeyError("k")) == "generation failed (KeyError: 'k')"


def test_gallery_lists_newest_first_with_sidecars(tmp_path):
    for k, name in enumerate(["b/old.png", "a/new.png", "c/nosidecar.png", "a/x.tmp.png"]):
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"png")
        if name != "c/nosidecar.png":
            path.with_suffix(".json").write_text(json.dumps({"k": k}))
        os.utime(path, ns=(10**18 + k, 10**18 + k))
    assert [(p.relative_to(tmp_path).as_posix(), s) for p, s in list_outputs(tmp_path)] == [
        ("c/nosidecar.png", {}), ("a/new.png", {"k": 1}), ("b/old.png", {"k": 0}),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def studio(tiny_checkpoint, tmp_path_factory):
    return Studio(str(tiny_checkpoint), out=tmp_path_factory.mktemp("studio-out"), device="cpu")


def test_progress_sees_every_step_and_the_decode(studio):
    seen = []
    made = studio.generate(Request("a fox", 64, 64, steps=3, images=2), progress=lambda *a: seen.append(a))
    assert [g.seed for g in made] == [0, 1] and all(g.path.is_file() for g in made)
    one = [("denoise", 1, 3), ("denoise", 2, 3), ("denoise", 3, 3), ("decode", 0, 1), ("decode", 1, 1)]
    assert seen == one * 2


def test_cancel_stops_at_the_next_step_and_writes_nothing(studio):
    seen = []

    def press_cancel(phase, k, n):
        seen.append(k)
        studio.cancel("session-a")

    run = studio.new_run_dir()
    with pytest.raises(Cancelled):
        studio.generate(Request("a fox", 64, 64, steps=5), session="session-a", progress=press_cancel, run_dir=run)
    assert seen == [1] and not run.exists()  # no image, and no empty run folder left behind
    assert not [p for p in studio.out.rglob("*") if p.is_dir() and not any(p.iterdir())]
    studio.cancel("session-b")  # another session's cancel does not touch this job, and session-a's is behind it
    assert len(studio.generate(Request("a fox", 64, 64, steps=1), session="session-a")) == 1


def test_a_cancel_stops_a_job_submitted_before_it_even_one_that_reaches_the_engine_after_it(studio, tiny_checkpoint,
                                                                                             tmp_path):  # fmt: skip
    submitted = time.monotonic()
    studio.cancel("session-c")  # pressed while the job's thread was still on its way to the engine
    run = studio.new_run_dir()
    with pytest.raises(Cancelled):
        studio.generate(Request("a fox", 64, 64, steps=3), session="session-c", since=submitted, run_dir=run)
    assert not run.exists()
    # the same Cancel does not stop the session's jobs submitted after it
    assert len(studio.generate(Request("a fox", 64, 64, steps=1), session="session-c")) == 1
    pair = Studio(str(tiny_checkpoint), out=tmp_path / "o", compare=str(tiny_checkpoint), device="cpu")
    pair.cancel("session-c")
    with pytest.raises(Cancelled):  # a compare submitted before it stops too, leaving nothing behind
        pair.compare(Request("a fox", 64, 64, steps=1), session="session-c", since=submitted)
    assert not list((tmp_path / "o").rglob("*.png"))
    assert set(pair.compare(Request("a fox", 64, 64, steps=1), session="session-c")) == {"model", "compare"}


def test_the_page_hands_the_engine_each_jobs_submission_time(studio):
    """Through a real Gradio queue: the validator stamps the job at submission and the job finds its stamp."""
    from gradio_client import Client
    from ultraflux_model.app.studio import build_app

    class Recording(Studio):
        def generate(self, request, **kwargs):
            seen.append((kwargs.get("since"), time.monotonic()))
            return super().generate(request, **kwargs)

    seen: list[tuple[float | None, float]] = []
    app = Recording(str(studio.main.ref), out=studio.out, device="cpu")
    demo = build_app(app, default_steps=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False)
    try:
        before = time.monotonic()
        Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False).predict(
            "a fox", 64, 64, 1, 4.0, 3, api_name="/generate")  # fmt: skip
    finally:
        demo.close()
    [(since, started)] = seen
    assert since is not None and before <= since <= started


def test_missing_model_and_missing_compare_fail_clearly(tmp_path):
    with pytest.raises(UltraFluxError, match="does not exist"):
        Studio(str(tmp_path / "nope"), out=tmp_path / "o", device="cpu").load()
    with pytest.raises(UltraFluxError, match="no second model"):
        Studio(str(tmp_path / "nope"), out=tmp_path / "o", device="cpu").compare(Request("x", 64, 64))


def test_make_ui_picks_the_newest_release_and_compares_with_the_previous(tmp_path, monkeypatch):
    from ultraflux_model.app.models import pick_models

    monkeypatch.chdir(tmp_path)  # the champion's default store is ./artifacts/mlflow.db: none here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UltraFluxError, match="run `make demo` first"):
        pick_models(tmp_path)
    old, new = tmp_path / "ultraflux-aaa", tmp_path / "ultraflux-bbb"
    for k, path in enumerate((old, new)):
        (path / "transformer").mkdir(parents=True)
        (path / "transformer" / "weights.safetensors").write_bytes(bytes([k]) * 64)  # other weights
        os.utime(path, ns=(10**18 + k, 10**18 + k))
    (tmp_path / "staging").mkdir()
    # No registry reachable in tests (HF_HUB_OFFLINE, no models:/ store): fall back to the release directories.
    assert pick_models(tmp_path, champion=str(tmp_path / "no-such-champion")) == (str(new), str(old))
    assert pick_models(tmp_path, champion=str(old)) == (str(old), str(new))  # a resolvable champion comes first


def test_make_ui_compares_by_content_never_a_release_with_itself(tmp_path):
    """The champion resolves to a copy (the model cache): the release it was logged from is the same model, so
    the other release is offered, and with no other weights anywhere the app opens one model."""
    from ultraflux_model.app.models import pick_models

    releases, cache = tmp_path / "release", tmp_path / "cache"
    old, new = releases / "ultraflux-aaa", releases / "ultraflux-bbb"
    for k, path in enumerate((old, new)):
        (path / "vae").mkdir(parents=True)
        (path / "vae" / "weights.safetensors").write_bytes(bytes([k]) * 64)
        os.utime(path, ns=(10**18 + k, 10**18 + k))
    shutil.copytree(new, cache / "3f2a")  # what models:/ultraflux@champion resolves to
    assert pick_models(releases, champion=str(cache / "3f2a")) == (str(cache / "3f2a"), str(old))
    shutil.rmtree(old)
    assert pick_models(releases, champion=str(cache / "3f2a")) == (str(cache / "3f2a"), None)  # alone
    shutil.copytree(new, releases / "ultraflux-ccc")  # the same weights released twice: still alone
    assert pick_models(releases, champion=str(cache / "3f2a")) == (str(cache / "3f2a"), None)


def test_gallery_selection_offers_the_png_and_its_sidecar(tmp_path):
    from ultraflux_model.app.studio import gallery_items, selected_item

    for name, sidecar in (("r1/a.png", {"width": 64, "height": 32, "seed": 3, "prompt": "a fox"}), ("r2/b.png", None)):
        path = tmp_path / name
        path.parent.mkdir()
        path.write_bytes(b"png")
        if sidecar:
            path.with_suffix(".json").write_text(json.dumps(sidecar))
        os.utime(path, ns=(10**18 + len(name) + (name == "r1/a.png"),) * 2)
    items, paths = gallery_items(tmp_path)
    assert paths == [str(tmp_path / "r1/a.png"), str(tmp_path / "r2/b.png")]
    assert items[0] == (paths[0], "64×32 · seed 3 · a fox")
    assert selected_item(paths, 0) == ({"width": 64, "height": 32, "seed": 3, "prompt": "a fox"},
                                       [paths[0], str(tmp_path / "r1/a.json")])  # fmt: skip
    assert selected_item(paths, 1) == ({}, [paths[1]])


def test_compare_takes_only_the_command_lines_models_and_names_no_path(tmp_path):
    from ultraflux_model.app.engine import hide_paths

    secret = tmp_path / "pickle-only"
    secret.mkdir()
    (secret / "model.pkl").write_bytes(b"not loaded")
    app = Studio(str(tmp_path / "a"), out=tmp_path / "o", compare=str(tmp_path / "b"), device="cpu")
    assert app.compare_choices == [str(tmp_path / "b")]
    for attack in ("/etc", "/root", str(secret)):
        with pytest.raises(UltraFluxError, match="unknown second model") as err:
            app.compare(Request("x", 64, 64), second=attack)
        assert attack not in friendly_error(err.value) and "/" not in friendly_error(err.value)
    assert not list((tmp_path / "o").iterdir())  # refused before a run directory was made or a model loaded
    assert hide_paths("checkpoint /srv/models/x does not exist ('/root/y')") == (
        "checkpoint <server path> does not exist ('<server path>')"
    )
    assert hide_paths("models:/ultraflux@champion, 1/steps, 16x9") == "models:/ultraflux@champion, 1/steps, 16x9"
    assert "/srv" not in friendly_error(UltraFluxError("checkpoint /srv/m does not exist"))


@pytest.mark.parametrize("attack,message", [({"steps": 10**9}, "steps must be between 1 and 200"),
                                            ({"guidance": float("inf")}, "guidance must be a finite number"),
                                            ({"seed": 2**63}, "seed must lie between 0 and 2\\*\\*63-1")])  # fmt: skip
def test_studio_refuses_the_setting_attacks_before_loading(tmp_path, attack, message):
    app = Studio(str(tmp_path / "no-model"), out=tmp_path / "o", device="cpu")
    with pytest.raises(UltraFluxError, match=message):
        app.generate(Request("a fox", 64, 64, **attack))
    assert app.main.pipe is None and not list((tmp_path / "o").iterdir())


@pytest.mark.parametrize("choice,message", [({"quantize": "fp8"}, "quantize: fp8 needs a CUDA GPU .* on cpu"),
                                            ({"cache": "warp"}, "cache must be one of"),
                                            ({"compile": "max"}, "compile must be one of")])  # fmt: skip
def test_studio_refuses_accelerators_the_device_cannot_run_before_loading(tmp_path, choice, message):
    app = Studio(str(tmp_path / "no-model"), out=tmp_path / "o", device="cpu")
    with pytest.raises(UltraFluxError, match=message):
        app.generate(Request("a fox", 64, 64, **choice))
    assert app.main.pipe is None and not list((tmp_path / "o").iterdir())


def test_size_controls_follow_a_typed_size():
    from ultraflux_model.app.sizes import CUSTOM, controls_for

    assert controls_for(5440, 3072) == ("16:9", "4K") and controls_for(1024, 1024) == ("1:1", "1K")
    assert controls_for(384, 256) == (CUSTOM, CUSTOM)  # 3:2 is no preset: never the stale "1:1"/"1K"
    assert controls_for(None, 256) == (CUSTOM, CUSTOM)


def test_png_carries_the_a1111_parameters_beside_the_json(studio):
    from ultraflux_model.inference.png_info import read_parameters

    made = studio.generate(Request("a red fox, snow", 64, 32, steps=2, guidance=3.5, seed=7))[0]
    text = read_parameters(made.path)
    prompt, line = text.split("\n")
    fields = dict(item.split(": ", 1) for item in line.split(", "))
    sidecar = json.loads(made.path.with_suffix(".json").read_text())
    assert prompt == sidecar["prompt"] == "a red fox, snow"
    assert (fields["Steps"], fields["Seed"], fields["Size"]) == ("2", "7", "64x32")
    assert fields["Distilled CFG Scale"] == "3.5"
    assert fields["Model hash"] == sidecar["model_hash"][:10] and fields["Sampler"] == "Euler"
    assert fields["Model"] == "tiny-ultraflux"  # the folder's name, no machine path inside a shared image


def test_a1111_parameters_quote_commas_and_hide_paths():
    from ultraflux_model.inference.png_info import parameters_text

    side = {"prompt": "x", "steps": 1, "guidance": 4.0, "seed": 0, "width": 64, "height": 64, "model_hash": "ab" * 32,
            "model": "models:/ultraflux@champion"}
    assert "Model: models:/ultraflux@champion," in parameters_text(side)
    assert 'Model: "a,b"' in parameters_text({**side, "model": "a,b"})
    assert "Model: my-release," in parameters_text({**side, "model": "/srv/models/my-release"})


def test_gallery_image_reused_makes_the_same_image(studio):
    import numpy as np
    from PIL import Image
    from ultraflux_model.app.engine import read_sidecar, request_from_sidecar

    first = studio.generate(Request("a lighthouse", 96, 64, steps=2, guidance=2.5, seed=41, images=2))[1]
    again = request_from_sidecar(read_sidecar(first.path))
    assert (again.prompt, again.width, again.height, again.steps, again.guidance, again.seed, again.images) == (
        "a lighthouse", 96, 64, 2, 2.5, 42, 1)  # the second image's own seed
    remade = studio.generate(again)[0]
    assert remade.path != first.path
    assert np.array_equal(np.asarray(Image.open(remade.path)), np.asarray(Image.open(first.path)))
    with pytest.raises(UltraFluxError, match="no usable settings sidecar"):
        request_from_sidecar({"prompt": "x"})


def test_compare_resolves_both_models_before_generating_anything(tiny_checkpoint, tmp_path):
    """A typo in the second model: one error naming it, before the first model generates (or even loads)."""
    app = Studio(str(tiny_checkpoint), out=tmp_path / "o", compare=str(tmp_path / "typo"), device="cpu")
    with pytest.raises(UltraFluxError) as err:
        app.compare(Request("a fox", 64, 64, steps=1))
    text = friendly_error(err.value)
    assert text.startswith("second model: checkpoint <server path> does not exist")
    assert text.count("does not exist") == 1  # said once
    assert app.main.pipe is None and not list((tmp_path / "o").iterdir())
    with pytest.raises(UltraFluxError, match="^second model: "):
        app.resolve_models(every=True)  # what `ultraflux ui` runs before loading any weights


def test_launch_banner_names_the_share_flag():
    from ultraflux.ui_cli import launch_banner

    text = launch_banner("http://127.0.0.1:7860/", None)
    assert "http://127.0.0.1:7860/" in text and "`ultraflux ui --share`" in text and "launch()" not in text
    assert "https://x.gradio.live" in launch_banner("http://127.0.0.1:7860/", "https://x.gradio.live")


def test_page_header_shows_no_machine_path():
    from ultraflux_model.app.engine import shown

    assert shown("/srv/models/ultraflux-ab12 (sha256 ab12)") == "ultraflux-ab12 (sha256 ab12)"
    assert shown("models:/ultraflux@champion") == "models:/ultraflux@champion"
