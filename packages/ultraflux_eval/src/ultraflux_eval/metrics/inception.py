"""The standard FID network: the TF-ported Inception-v3 (``pt_inception-2015-12-05``) as torch-fidelity ships it,
with the two standard ways of bringing an image to its 299×299 input.

Published FIDs (torch-fidelity, torchmetrics' ``FrechetInceptionDistance``, clean-fid, the TTUR reference) all
use this network's 2048-d pool features; torchvision's ImageNet ``inception_v3`` gives different numbers.

Resize modes (:func:`prepare`):

- ``legacy`` — what torch-fidelity and torchmetrics (up to 1.5, and with ``antialias=False`` since) do to whatever
  they are given: uint8 pixels to float, then TensorFlow-1.x bilinear resize to 299×299
  (``interpolate_bilinear_2d_like_tensorflow1x``), no antialiasing. The whole image is squashed to a square, so its
  aspect ratio is lost. The config default (today's behaviour).
- ``d4k`` — Diffusion-4K's ``generate_and_eval_fid.py`` (the script behind the numbers UltraFlux's table compares
  with): torchvision's ``resize(image, size)`` on the uint8 image (short side to ``size``, the generation size;
  bilinear, antialiased, rounded back to uint8) and ``center_crop(size)``, then the ``legacy`` path, which is what
  torchmetrics 1.5.1's ``FrechetInceptionDistance(normalize=False)`` (pinned by Diffusion-4K) does inside. Newer
  torchmetrics defaults to ``antialias=True`` in its Inception, about 1 % off; ``d4k`` equals
  ``FrechetInceptionDistance(normalize=False, antialias=False)``.
- ``clean`` — clean-fid's ``clean`` mode (Parmar et al., 2022): each channel resized on its own as a float PIL
  image with bicubic filtering to 299×299, clipped to [0, 255], never quantised (``make_resizer("PIL", False,
  "bicubic", (299, 299))``).

Both feed float ``[N, 3, 299, 299]`` in [0, 255] to the same network, which maps ``x ↦ (x − 128) / 128`` first.

CI's stand-in for it is :class:`TinyFeatureExtractor` (random conv features at any input side).

Trust: torch-fidelity's release file is a pickle (``.pth``); the manifest checks its sha256 and it is read only
with ``torch.load(weights_only=True)`` (torch-fidelity's own loader, which unpickles freely, is bypassed).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from ultraflux_eval.backbones.checkpoints import load_state_dict_file
from ultraflux_eval.errors import EvalError

INPUT_SIDE = 299
ResizeMode = Literal["legacy", "clean", "d4k"]
RESIZE_MODES: tuple[str, ...] = ("legacy", "clean", "d4k")
# torch-fidelity's forward up to the 2048-d pool, in order (its `forward` also computes logits we do not need)
TRUNK = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "MaxPool_2",
    "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
    "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool",
)


def _fidelity_class() -> type[nn.Module]:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:  # a core dependency; a broken environment should still say what to install
        raise EvalError("FID needs torch-fidelity: pip install torch-fidelity") from err
    return FeatureExtractorInceptionV3


def _chw(rgb: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` array (or an already channel-first ``[3, H, W]`` tensor) → ``[1, 3, H, W]`` tensor."""
    if isinstance(rgb, torch.Tensor):
        return rgb.unsqueeze(0)
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0)


def resize_legacy(rgb: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` (or ``[3, H, W]`` tensor) → float32 ``[3, 299, 299]`` in [0, 255], torch-fidelity's
    TF-1.x bilinear resize."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = _chw(rgb).float()
    if x.shape[-2:] != (INPUT_SIDE, INPUT_SIDE):
        x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(INPUT_SIDE, INPUT_SIDE), align_corners=False)
    return x.squeeze(0)


def resize_clean(rgb: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` → float32 ``[3, 299, 299]``: clean-fid's per-channel float PIL bicubic resize."""
    channels = []
    for c in range(3):
        plane = Image.fromarray(np.ascontiguousarray(rgb[:, :, c]).astype(np.float32), mode="F")
        plane = plane.resize((INPUT_SIDE, INPUT_SIDE), resample=Image.Resampling.BICUBIC)
        channels.append(np.asarray(plane).clip(0, 255))
    return torch.from_numpy(np.stack(channels).astype(np.float32))


def crop_d4k(rgb: np.ndarray, size: int) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` → uint8 ``[3, size, size]``: Diffusion-4K's ``fid_preprocess``, i.e. torchvision's
    ``resize(image, size)`` (short side to ``size``, bilinear, antialiased) then ``center_crop(size)``."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    x = tvf.resize(_chw(rgb), size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    return tvf.center_crop(x, [size, size]).squeeze(0)


def prepare(rgb: np.ndarray, mode: ResizeMode, crop_size: int | None = None) -> torch.Tensor:
    """One image to the network's float input ``[3, 299, 299]`` by ``mode``; ``d4k`` needs ``crop_size`` (the
    generation size its short side is resized to and centre-cropped at, before the ``legacy`` path)."""
    if mode == "legacy":
        return resize_legacy(rgb)
    if mode == "clean":
        return resize_clean(rgb)
    if mode == "d4k":
        if crop_size is None or crop_size < 1:
            raise EvalError(f"the d4k FID resize needs a crop size (the generation size), got {crop_size!r}")
        return resize_legacy(crop_d4k(rgb, crop_size))
    raise EvalError(f"FID resize mode must be one of {list(RESIZE_MODES)}, got {mode!r}")


class StandardInception(nn.Module):
    """torch-fidelity's ``FeatureExtractorInceptionV3`` → 2048-d pool features.

    Input: float or uint8 ``[N, 3, H, W]`` in [0, 255]; sides other than 299 are resized the legacy way first
    (so uint8 batches give exactly torch-fidelity's features). Output: ``[N, 2048]`` float32.
    """

    num_features = 2048
    side = INPUT_SIDE

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise EvalError(f"the Inception extractor takes [N, 3, H, W] images, got {tuple(images.shape)}")
        x = images.to(torch.float32)
        if x.shape[-2:] != (INPUT_SIDE, INPUT_SIDE):
            from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

            x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(INPUT_SIDE, INPUT_SIDE), align_corners=False)
        x = (x - 128) / 128  # the TF graph's own normalisation, as torch-fidelity computes it
        for name in TRUNK:
            x = getattr(self.net, name)(x)
        return torch.flatten(x, 1).to(torch.float32)


def _skeleton() -> nn.Module:
    """torch-fidelity's network with default-initialised parameters, built without reading any checkpoint.

    Its constructor insists on loading a file (or downloading one): it is handed an empty state dict, which the
    subclass ignores, so the real weights are loaded afterwards from tensors we have already checked.
    """

    class _Unloaded(_fidelity_class()):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            if not state_dict:  # the constructor's empty placeholder
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        return _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))


def load_standard_inception(path: Path) -> StandardInception:
    """torch-fidelity's Inception from its weights file (``weights-inception-2015-12-05-6726825d.pth`` format),
    read once through ``checkpoints.load_state_dict_file``: tensors only, never code."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"Inception weights {path} do not exist: run `ultraflux-eval weights fetch --only fid`")
    try:
        state = load_state_dict_file(path)
    except Exception as err:  # noqa: BLE001 - torch raises several types for unsafe or corrupt pickles
        raise EvalError(f"{path} is not a plain tensor checkpoint (refused to unpickle it): {err}") from err
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise EvalError(f"{path} is not torch-fidelity's Inception state dict (no `Mixed_7c.branch_pool...` key)")
    net = _skeleton()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise EvalError(f"{path} does not fit torch-fidelity's Inception: {err}") from err
    return StandardInception(net)


class TinyFeatureExtractor(nn.Module):
    """Random conv features for FID in CI: uint8 ``[N, 3, H, W]`` → ``[N, 32]`` float32.

    Mean and standard deviation pooling of two random conv layers: the features respond to colour, contrast
    and texture, so different image sets get different statistics.
    """

    num_features = 32

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        for conv in (self.conv1, self.conv2):
            fan_in = conv.in_channels * 9
            conv.weight.data = torch.randn(conv.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5
            conv.bias.data = torch.randn(conv.bias.shape, generator=generator) * 0.1
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded random state dict of torch-fidelity's Inception (for tests: real weights cannot be downloaded).

    He-normal convolutions and identity batch norms keep activations O(1) through the 48 layers, so features of
    different images differ (a default-initialised net collapses them towards zero).
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in _skeleton().state_dict().items():
        if key.endswith("conv.weight") or key == "fc.weight":
            state[key] = torch.randn(value.shape, generator=generator) * (2.0 / value[0].numel()) ** 0.5
        elif key.endswith(("bn.weight", "bn.running_var")):
            state[key] = torch.ones_like(value)
        elif key.endswith("bn.bias"):
            state[key] = torch.randn(value.shape, generator=generator) * 0.1
        elif key.endswith("num_batches_tracked"):
            state[key] = value.clone()
        else:  # bn.running_mean, fc.bias
            state[key] = torch.zeros_like(value)
    return state


def write_random_inception_weights(path: Path, seed: int = 0) -> Path:
    """Save :func:`random_inception_state` in torch-fidelity's file format (a ``torch.save``'d state dict)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_inception_state(seed), path)
    return path
