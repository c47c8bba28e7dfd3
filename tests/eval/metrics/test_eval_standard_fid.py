"""The standard FID family against its references: torch-fidelity's FID on the same weights file (legacy
resize), clean-fid's resizer (clean mode), and patch-FID as torch-fidelity's FID of the native crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner
from ultraflux_eval.cli import app
from ultraflux_eval.errors import EvalError
from ultraflux_eval.metrics.fidelity import native_crops
from ultraflux_eval.metrics.inception import load_standard_inception, resize_clean, write_random_inception_weights


def _write_set(folder, count, width, height, seed, scale):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        # smooth colour fields plus noise: sets with different `scale` differ in texture statistics
        base = rng.uniform(0, 255, size=(1, 1, 3))
        ramp = np.linspace(0, 1, width)[None, :, None] * rng.uniform(-80, 80, size=(1, 1, 3))
        noise = rng.normal(0, scale, size=(height, width, 3))
        pixels = np.clip(base + ramp + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random Inception in torch-fidelity's file format (the real one cannot be downloaded in CI)."""
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth", seed=0)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid-sets")
    return _write_set(root / "a", 3, 96, 72, 0, 10.0), _write_set(root / "b", 3, 96, 72, 1, 60.0)


def _last_line(result) -> float:
    assert result.exit_code == 0, result.output
    return float(result.output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def legacy(weights, sets) -> float:
    a, b = sets
    return _last_line(CliRunner().invoke(app, ["fid", str(a), str(b), "--inception-weights", str(weights)]))


def test_fid_equals_torch_fidelity_on_the_same_weights(weights, sets, legacy):
    import torch_fidelity

    a, b = sets
    ours = legacy
    theirs = torch_fidelity.calculate_metrics(
        input1=str(a), input2=str(b), fid=True, feature_extractor_weights_path=str(weights), cuda=False,
        cache=False, verbose=False, save_cpu_ram=True,
    )["frechet_inception_distance"]
    assert ours > 0
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_clean_resize_equals_clean_fid_and_changes_the_value(weights, sets, legacy):
    from cleanfid.resize import make_resizer

    rgb = np.random.default_rng(3).integers(0, 256, size=(71, 133, 3), dtype=np.uint8)
    theirs = make_resizer("PIL", False, "bicubic", (299, 299))(rgb)  # [299, 299, 3] float32
    ours = resize_clean(rgb).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, theirs)

    a, b = sets
    clean = _last_line(CliRunner().invoke(app, ["fid", str(a), str(b), "--inception-weights", str(weights),
                                                "--resize", "clean"]))
    assert clean > 0 and clean != pytest.approx(legacy, rel=1e-4)


def test_patch_fid_is_torch_fidelity_fid_of_the_native_crops(weights, tmp_path):
    import torch_fidelity

    a = _write_set(tmp_path / "a", 2, 600, 300, 4, 10.0)
    b = _write_set(tmp_path / "b", 2, 600, 300, 5, 40.0)
    crops = {}
    for name, folder in (("a", a), ("b", b)):
        out = tmp_path / f"crops-{name}"
        out.mkdir()
        for path in sorted(folder.iterdir()):
            for k, crop in enumerate(native_crops(path, 299, 2)):  # a 600x300 image holds 2x1 full tiles
                assert crop.shape == (299, 299, 3)
                Image.fromarray(crop).save(out / f"{path.stem}-{k}.png")
        crops[name] = out
    ours = _last_line(CliRunner().invoke(app, ["fid", str(a), str(b), "--inception-weights", str(weights),
                                               "--patch", "--patches-per-image", "2"]))
    theirs = torch_fidelity.calculate_metrics(
        input1=str(crops["a"]), input2=str(crops["b"]), fid=True, feature_extractor_weights_path=str(weights),
        cuda=False, cache=False, verbose=False, save_cpu_ram=True,
    )["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_inception_refuses_non_tensor_pickles_and_wrong_files(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"Mixed_7c.branch_pool.conv.weight": torch.zeros(1), "code": print}, evil)
    with pytest.raises(EvalError, match="refused to unpickle"):
        load_standard_inception(evil)
    other = tmp_path / "other.pth"
    torch.save({"w": torch.zeros(1)}, other)
    with pytest.raises(EvalError, match="not torch-fidelity's Inception"):
        load_standard_inception(other)
    with pytest.raises(EvalError, match="weights fetch"):
        load_standard_inception(tmp_path / "missing.pth")
    result = CliRunner().invoke(app, ["fid", str(tmp_path), str(tmp_path), "--resize", "bicubic",
                                      "--inception-weights", str(other)])
    assert result.exit_code != 0 and "--resize must be one of" in str(result.exception)


def _d4k_reference(path, size: int) -> torch.Tensor:
    """Diffusion-4K's ``fid_preprocess`` (generate_and_eval_fid.py), as written there: uint8 ``[1, 3, size, size]``."""
    from torchvision.transforms import functional as F

    image = torch.tensor(np.array(Image.open(path).convert("RGB"))).unsqueeze(0).permute(0, 3, 1, 2)
    return F.center_crop(F.resize(image, size), (size, size))


def test_d4k_fid_equals_torchmetrics_on_non_square_sets(weights, tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    # non-square references and generations of different shapes: landscape, portrait
    a = _write_set(tmp_path / "a", 3, 200, 120, 6, 10.0)
    b = _write_set(tmp_path / "b", 3, 130, 210, 7, 50.0)
    size = 112  # the generation size: both sets are resized (short side) and centre-cropped to it
    ours = _last_line(CliRunner().invoke(app, ["fid", str(a), str(b), "--inception-weights", str(weights),
                                               "--resize", "d4k", "--crop-size", str(size)]))
    # torchmetrics 1.5.1's FID (Diffusion-4K's pin) is today's with antialias=False; the same weights file
    metric = FrechetInceptionDistance(normalize=False, antialias=False, feature_extractor_weights_path=str(weights))
    for folder, real in ((a, True), (b, False)):
        for path in sorted(folder.iterdir()):
            metric.update(_d4k_reference(path, size), real=real)
    theirs = float(metric.compute())
    assert ours > 0
    assert ours == pytest.approx(theirs, rel=1e-5)
    # the squash protocol sees the whole, distorted image and gives another number on these sets
    squash = _last_line(CliRunner().invoke(app, ["fid", str(a), str(b), "--inception-weights", str(weights)]))
    assert squash != pytest.approx(theirs, rel=1e-3)
