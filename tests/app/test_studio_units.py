"""The app's pieces without a server: request limits, presets from the bucket table, errors, progress, cancel."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from ultraflux.config import UltraFluxConfig
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.app.engine import Cancelled, Request, Studio, friendly_error, list_outputs
from ultraflux_model.app.sizes import ASPECTS, FAMILIES, preset_size, size_note
from ultraflux_model.buckets import BUCKETS, BUCKETS_4K
from ultraflux_model.config import MAX_4K_BUCKET_PIXELS, ServeConfig
from ultraflux_model.inference.limits import check_request


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
    assert seen == [1] and not list(run.glob("*.png"))
    studio.cancel("session-b")  # another session's cancel does not touch this job, and a stale one is cleared
    assert len(studio.generate(Request("a fox", 64, 64, steps=1), session="session-a")) == 1


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
