"""The protocol: per-aspect and overall tables equal the metrics applied to each group; bad input fails early."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from ultraflux_eval.backbones.loading import tiny_backbones
from ultraflux_eval.config import BenchmarkConfig
from ultraflux_eval.errors import EvalError
from ultraflux_eval.metrics import fidelity, scores
from ultraflux_eval.protocol.evaluate import OVERALL, evaluate, load_image_dir, nearest_aspect, validate_spec

ALL = ("glcm", "compression_ratio", "shannon_entropy", "flat_percentage", "clip_score", "aesthetic", "pickscore",
       "hps", "fid", "patch_fid")


def picture(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 120 + 70 * np.sin(xx / (4 + seed % 5)) * np.cos(yy / (6 + seed % 3))
    rgb = base[..., None] + rng.normal(0, 10 + 5 * (seed % 4), (h, w, 3)) + rng.uniform(-30, 30, 3)
    return np.clip(rgb, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def spec() -> BenchmarkConfig:
    return BenchmarkConfig(metrics=ALL, prompts=("a fox", "a lighthouse"), patch_size=64, patches_per_image=2)


@pytest.fixture(scope="module")
def generated(spec):
    images, prompts = [], []
    for k, aspect in enumerate(spec.aspect_ratios):
        for j, prompt in enumerate(spec.prompts):
            images.append(picture(aspect.height, aspect.width, 10 * k + j))
            prompts.append(prompt)
    reference = [picture(128, 160, 100 + i) for i in range(4)]
    return images, prompts, reference


@pytest.fixture(scope="module")
def results(spec, generated):
    images, prompts, reference = generated
    quality = {"brightness": _Brightness()}
    return evaluate(images, prompts, spec, backbones=tiny_backbones(ALL, fid_size=32), reference=reference,
                    scorers=quality, batch_size=4)


class _Brightness:
    name = "brightness"

    def score(self, images):
        return np.array([scores.load_rgb(x).mean() for x in images])


def test_table_has_every_aspect_and_overall(results, spec):
    assert results.aspects == [a.name for a in spec.aspect_ratios]
    assert set(results.table) == {*results.aspects, OVERALL}
    for row in results.table.values():
        assert set(row) == {"n_images", *ALL, "brightness"}
        assert all(np.isfinite(v) for v in row.values())
    keys = results.flat_metrics()
    assert "clip_score/16:9" in keys and "fid/overall" in keys and "glcm/2.39:1" in keys
    assert len(keys) == 6 * (len(ALL) + 2)


def test_groups_equal_direct_computations(results, generated, spec):
    images, prompts, reference = generated
    for k, aspect in enumerate(results.aspects):
        members = images[2 * k : 2 * k + 2]
        row = results.table[aspect]
        assert row["n_images"] == 2
        assert row["glcm"] == pytest.approx(np.mean([scores.glcm_score(x) for x in members]), rel=1e-12)
        assert row["flat_percentage"] == np.mean([scores.flat_percentage(x) for x in members])
        assert row["compression_ratio"] == scores.compression_ratio(members)
        assert row["brightness"] == pytest.approx(np.mean([x.mean() for x in members]))
    assert results.table[OVERALL]["compression_ratio"] == scores.compression_ratio(images)
    entropies = [scores.shannon_entropy(x) for x in images]
    assert results.table[OVERALL]["shannon_entropy"] == pytest.approx(np.mean(entropies))
    extractor = tiny_backbones(["fid"]).inception
    assert results.table["1:2"]["fid"] == pytest.approx(fidelity.fid(reference, images[6:8], extractor, 32), rel=1e-9)
    assert results.table[OVERALL]["patch_fid"] == pytest.approx(
        fidelity.patch_fid(reference, images, extractor, 64, 2), rel=1e-9
    )


def test_aspects_are_assigned_by_nearest_log_ratio(spec):
    assert nearest_aspect(4096, 4096, spec.aspect_ratios) == "1:1"
    assert nearest_aspect(5440, 3072, spec.aspect_ratios) == "16:9"
    assert nearest_aspect(6336, 2624, spec.aspect_ratios) == "2.39:1"
    assert nearest_aspect(2880, 5760, spec.aspect_ratios) == "1:2"


def test_bad_input_fails_before_scoring(spec, generated, tmp_path):
    images, prompts, reference = generated
    with pytest.raises(EvalError, match="10 images but 9 prompts"):
        evaluate(images, prompts[:-1], spec, reference=reference)
    missing = [*images[:-1], tmp_path / "gone.png"]
    with pytest.raises(EvalError, match="does not exist"):
        evaluate(missing, prompts, spec, reference=reference)
    small = BenchmarkConfig(metrics=("glcm", "shannon_entropy"))
    with pytest.raises(EvalError, match="glcm needs both sides >= 64"):
        evaluate([picture(64, 64, 0), picture(40, 200, 1)], ["a", "b"], small)
    with pytest.raises(EvalError, match="need reference images"):
        evaluate(images, prompts, spec)
    with pytest.raises(EvalError, match="at least 2 per aspect"):
        evaluate(images[:3], prompts[:3], spec, reference=reference)
    with pytest.raises(EvalError, match="not in the benchmark"):
        evaluate(images[:2], prompts[:2], small, aspects=["1:1", "3:1"])


def test_image_directory_with_sidecars_or_prompts_file(tmp_path):
    for i in range(3):
        Image.fromarray(picture(64, 96, i)).save(tmp_path / f"{i:02d}.png")
        (tmp_path / f"{i:02d}.json").write_text(json.dumps({"prompt": f"prompt {i}", "seed": i}))
    paths, prompts = load_image_dir(tmp_path)
    assert [p.name for p in paths] == ["00.png", "01.png", "02.png"] and prompts == ["prompt 0", "prompt 1", "prompt 2"]
    (tmp_path / "prompts.txt").write_text("x\n\ny\nz\n")
    assert load_image_dir(tmp_path, tmp_path / "prompts.txt")[1] == ["x", "y", "z"]
    (tmp_path / "short.txt").write_text("x\n")
    with pytest.raises(EvalError, match="3 images .* but 1 prompts"):
        load_image_dir(tmp_path, tmp_path / "short.txt")
    (tmp_path / "01.json").unlink()
    with pytest.raises(EvalError, match="no prompt for .*01.png"):
        load_image_dir(tmp_path)
    with pytest.raises(EvalError, match="does not exist"):
        load_image_dir(tmp_path / "nope")


def test_spec_is_checked_before_generating(tmp_path):
    from ultraflux_eval.config import AspectSize

    validate_spec(BenchmarkConfig())  # the tiny default is evaluable
    tiny_side = BenchmarkConfig(aspect_ratios=(AspectSize(name="1:1", width=48, height=48),))
    with pytest.raises(EvalError, match="aspect 1:1 is 48x48: glcm needs both sides >= 64"):
        validate_spec(tiny_side)
    no_reference = BenchmarkConfig(metrics=("fid",))
    with pytest.raises(EvalError, match="reference_dir"):
        validate_spec(no_reference)
    Image.fromarray(picture(64, 64, 0)).save(tmp_path / "r.png")
    one_prompt = BenchmarkConfig(metrics=("fid",), prompts=("x",), reference_dir=tmp_path)
    with pytest.raises(EvalError, match="at least 2 images per aspect"):
        validate_spec(one_prompt)


# --------------------------------------------------------------------------- overall with unequal aspect groups

UNEQUAL = {"1:1": 3, "16:9": 2, "2:1": 1}  # 3 + 2 + 1 images: the per-image mean and the mean of means differ


def unequal_set(spec: BenchmarkConfig) -> tuple[list[np.ndarray], list[str], list[str]]:
    """Images of very different detail per aspect group, so group means are far apart."""
    sizes = {a.name: (a.height, a.width) for a in spec.aspect_ratios}
    images, labels = [], []
    for k, (name, count) in enumerate(UNEQUAL.items()):
        for j in range(count):
            rgb = picture(*sizes[name], seed=3 * k + j)
            if name == "2:1":  # a nearly flat image: far lower entropy and GLCM than the others
                rgb = (rgb // 64 * 64).astype(np.uint8)
            images.append(rgb)
            labels.append(name)
    return images, [f"prompt {i}" for i in range(len(images))], labels


def mean_of_aspect_means(values: list[float], labels: list[str]) -> float:
    return float(np.mean([np.mean([v for v, a in zip(values, labels, strict=True) if a == name]) for name in UNEQUAL]))


def test_overall_is_the_per_image_mean_with_unequal_aspect_groups():
    spec = BenchmarkConfig(metrics=("glcm", "shannon_entropy", "compression_ratio"))
    images, prompts, labels = unequal_set(spec)
    results = evaluate(images, prompts, spec, aspects=labels, scorers={"brightness": _Brightness()})
    assert results.aspects == list(UNEQUAL)
    assert {a: results.table[a]["n_images"] for a in UNEQUAL} == {a: float(n) for a, n in UNEQUAL.items()}
    assert results.table[OVERALL]["n_images"] == 6
    per_image = {
        "glcm": [scores.glcm_score(x) for x in images],
        "shannon_entropy": [scores.shannon_entropy(x) for x in images],
        "brightness": [float(x.mean()) for x in images],
    }
    for metric, values in per_image.items():
        overall = results.table[OVERALL][metric]
        assert overall == pytest.approx(np.mean(values), rel=1e-12), metric
        # the other definition would fail: it differs by far more than the tolerance above
        assert abs(overall - mean_of_aspect_means(values, labels)) > 1e-3 * abs(overall), metric
    assert results.table[OVERALL]["compression_ratio"] == scores.compression_ratio(images)
