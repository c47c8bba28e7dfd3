"""Networks behind the learned metrics: local weights checked by sha256, or tiny random stand-ins for CI.

Production weights live in one directory with a ``manifest.yaml``::

    files:                      # every file, relative to the directory, with its sha256
      clip/config.json: 3f1c...
      clip/model.safetensors: 9a0b...
    backbones:                  # which file or folder each role loads from
      clip: clip                # HF CLIPModel folder (CLIP score; features for the aesthetic head)
      aesthetic_head: aesthetic/head.safetensors   # LAION MLP (768-1024-128-64-16-1) on CLIP image embeds
      pickscore: pickscore      # HF CLIPModel folder (PickScore_v1)
      hps: hps                  # HF CLIPModel folder (HPS-style preference model in HF CLIP layout)
      inception: inception/weights-inception-2015-12-05-6726825d.pth  # torch-fidelity's TF-ported Inception
      musiq: musiq/musiq_koniq_ckpt-e95806b9.pth   # pyiqa MUSIQ (KonIQ-10k), read with weights_only=True
      hpsv3: hpsv3                # Qwen2-VL-7B-Instruct config + processor files and HPSv3.safetensors
      qalign: qalign              # q-future/one-align (mPLUG-Owl2): config, tokenizer, preprocessor, shards
      artimuse: artimuse          # Thunderbolt215215/ArtiMuse (InternVL layout): config, tokenizer, shards

Loading never downloads: a missing or altered file is an ``EvalError`` naming it (``ultraflux-eval weights fetch``
fills the directory from the hubs at pinned revisions, see :mod:`ultraflux_eval.weights`). ``tiny`` backbones are
built offline from fixed seeds with the same interfaces, initialised so that different images and prompts get
different features (metrics are not degenerate), which is all CI needs.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from ultraflux_eval.checkpoints import load_state_dict_file
from ultraflux_eval.errors import EvalError

MANIFEST = "manifest.yaml"
ROLES = ("clip", "aesthetic_head", "pickscore", "hps", "inception", "musiq", "hpsv3", "qalign", "artimuse")
# which roles each metric needs
METRIC_ROLES: dict[str, tuple[str, ...]] = {
    "clip_score": ("clip",),
    "aesthetic": ("clip", "aesthetic_head"),
    "pickscore": ("pickscore",),
    "hps": ("hps",),
    "fid": ("inception",),
    "patch_fid": ("inception",),
    "musiq": ("musiq",),
    "hpsv3": ("hpsv3",),
    "qalign": ("qalign",),
    "artimuse": ("artimuse",),
}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(weights_dir: Path) -> dict:
    path = Path(weights_dir) / MANIFEST
    if not path.is_file():
        raise EvalError(
            f"no weights manifest at {path}: put the backbone files in {weights_dir} and run "
            f"`ultraflux-eval weights manifest {weights_dir}` (or use eval.backbones.source=tiny)"
        )
    try:
        manifest = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise EvalError(f"weights manifest {path} is not valid YAML: {err}") from err
    if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("backbones", {}), dict):
        raise EvalError(f"weights manifest {path} needs a `files:` mapping (path: sha256) and a `backbones:` mapping")
    unknown = set(manifest.get("backbones", {})) - set(ROLES)
    if unknown:
        raise EvalError(f"weights manifest {path} names unknown backbones {sorted(unknown)}; known: {list(ROLES)}")
    return manifest


def role_files(manifest: dict, role: str) -> list[str]:
    """Manifest files that belong to a role (the file itself, or every file under its folder)."""
    target = manifest["backbones"][role].rstrip("/")
    return [f for f in manifest["files"] if f == target or f.startswith(target + "/")]


def verify_weights(weights_dir: Path, roles: Iterable[str] | None = None) -> list[str]:
    """Check that every manifest file of ``roles`` (all when None) exists with its sha256; return the checked files.

    Raises ``EvalError`` listing each missing or altered file.
    """
    weights_dir = Path(weights_dir)
    manifest = read_manifest(weights_dir)
    wanted = list(manifest.get("backbones", {})) if roles is None else list(roles)
    missing_roles = [r for r in wanted if r not in manifest.get("backbones", {})]
    if missing_roles:
        raise EvalError(
            f"weights manifest {weights_dir / MANIFEST} has no entry for {missing_roles}: add them under `backbones:`"
        )
    if roles is None:
        files = sorted(manifest["files"])
    else:
        files = sorted({f for role in wanted for f in role_files(manifest, role)})
    problems = []
    for rel in files:
        path = weights_dir / rel
        if not path.is_file():
            problems.append(f"missing file {path}")
        elif sha256_file(path) != manifest["files"][rel]:
            problems.append(f"sha256 mismatch for {path} (expected {manifest['files'][rel]})")
    for role in wanted:
        if not role_files(manifest, role):
            problems.append(f"backbone {role!r} points at {manifest['backbones'][role]!r}, which lists no files")
    if problems:
        raise EvalError("eval weights are not usable:\n  " + "\n  ".join(problems))
    return files


def write_manifest(weights_dir: Path, backbones: dict[str, str]) -> Path:
    """Hash every file under ``weights_dir`` and write ``manifest.yaml`` mapping roles to paths."""
    weights_dir = Path(weights_dir)
    unknown = set(backbones) - set(ROLES)
    if unknown:
        raise EvalError(f"unknown backbones {sorted(unknown)}; known: {list(ROLES)}")
    files = {
        str(p.relative_to(weights_dir)): sha256_file(p)
        for p in sorted(weights_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    path = weights_dir / MANIFEST
    path.write_text(yaml.safe_dump({"files": files, "backbones": backbones}, sort_keys=True))
    return path


# --- networks ---


@dataclass
class ClipBundle:
    """A CLIP-like dual encoder with its tokenizer and image processor (HF ``CLIPModel`` layout)."""

    model: nn.Module
    tokenizer: object
    processor: object
    max_length: int

    @torch.no_grad()
    def image_embeds(self, images: list[np.ndarray], device: str = "cpu") -> torch.Tensor:
        """RGB uint8 ``[H, W, 3]`` list → L2-normalised projected embeddings ``[N, D]`` float32."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str], device: str = "cpu") -> torch.Tensor:
        """Prompts → L2-normalised projected embeddings ``[N, D]`` float32 (truncated to the text context)."""
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        pooled = self.model.text_model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).pooler_output
        return nn.functional.normalize(self.model.text_projection(pooled).float(), dim=-1)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())


class AestheticHead(nn.Module):
    """LAION improved-aesthetic-predictor MLP on L2-normalised CLIP image embeddings: ``[N, D]`` → ``[N]``."""

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)


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


def tiny_clip(seed: int = 0) -> ClipBundle:
    """A 2-layer CLIP (32-px images, character-level tokenizer) built offline from ``seed``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(set(string.ascii_lowercase + string.digits + string.punctuation)):
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    # Random towers give near-orthogonal image/text embeddings, so clamped CLIP scores would all be 0. A shared
    # projection and a shared offset after both final norms give the pairs a common direction: cosines land
    # mostly in (0, 1) and still vary with the image and the prompt.
    with torch.no_grad():
        shared = torch.randn(32) * 0.5
        model.vision_model.post_layernorm.bias.copy_(shared)
        model.text_model.final_layer_norm.bias.copy_(shared)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return ClipBundle(model, CLIPTokenizer(vocab=vocab, merges=[]), processor, max_length=77)


def tiny_aesthetic_head(dim: int = 16, seed: int = 0) -> AestheticHead:
    torch.manual_seed(seed)
    return AestheticHead(dim).eval()


def load_clip(folder: Path) -> ClipBundle:
    """An HF CLIPModel folder (config, safetensors weights, tokenizer, preprocessor), strictly offline."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise EvalError(f"cannot load the CLIP backbone from {folder}: {err}") from err
    return ClipBundle(model, tokenizer, processor, max_length=model.config.text_config.max_position_embeddings)


def load_aesthetic_head(path: Path) -> AestheticHead:
    state = load_state_dict_file(path)
    # LAION's checkpoint keys are `layers.N.weight`; the first Linear fixes the embedding width.
    first = state.get("layers.0.weight")
    if first is None:
        raise EvalError(f"{path} is not a LAION aesthetic head (no `layers.0.weight`)")
    head = AestheticHead(first.shape[1])
    head.load_state_dict(state)
    return head.eval()


@dataclass
class Backbones:
    """The networks a set of metrics needs (roles not needed stay None)."""

    clip: ClipBundle | None = None
    aesthetic_head: AestheticHead | None = None
    pickscore: ClipBundle | None = None
    hps: ClipBundle | None = None
    inception: nn.Module | None = None
    fid_size: int = 64  # the extractor's input side
    tiny: bool = True
    fid_resize: str = "antialias"  # how whole images reach fid_size: antialias (tiny), legacy or clean (Inception)
    musiq: nn.Module | None = None
    hpsv3: object | None = None  # ultraflux_eval.hpsv3.HPSv3Scorer
    qalign: object | None = None  # ultraflux_eval.qalign.QAlignScorer
    artimuse: object | None = None  # ultraflux_eval.artimuse.ArtiMuseScorer

    def require(self, role: str) -> object:
        value = getattr(self, role)
        if value is None:
            raise EvalError(f"backbone {role!r} was not loaded; load_backbones(...) with the metric that needs it")
        return value


def needed_roles(metrics: Iterable[str]) -> list[str]:
    return sorted({role for metric in metrics for role in METRIC_ROLES.get(metric, ())})


def tiny_backbones(metrics: Iterable[str], seed: int = 0, fid_size: int = 64) -> Backbones:
    """Random tiny networks for the roles ``metrics`` need; the preference models get their own seeds."""
    roles = needed_roles(metrics)
    out = Backbones(fid_size=fid_size, tiny=True)
    if "clip" in roles:
        out.clip = tiny_clip(seed)
    if "aesthetic_head" in roles:
        out.aesthetic_head = tiny_aesthetic_head(16, seed)
    if "pickscore" in roles:
        out.pickscore = tiny_clip(seed + 1)
    if "hps" in roles:
        out.hps = tiny_clip(seed + 2)
    if "inception" in roles:
        out.inception = TinyFeatureExtractor(seed)
    if "musiq" in roles:
        from ultraflux_eval.iqa import build_musiq

        out.musiq = build_musiq(tiny=True, seed=seed)
    if "hpsv3" in roles:
        from ultraflux_eval.hpsv3 import tiny_hpsv3

        out.hpsv3 = tiny_hpsv3(seed + 3)
    if "qalign" in roles:
        from ultraflux_eval.qalign import tiny_qalign

        out.qalign = tiny_qalign(seed + 4)
    if "artimuse" in roles:
        from ultraflux_eval.artimuse import tiny_artimuse

        out.artimuse = tiny_artimuse(seed + 5)
    return out


def local_backbones(
    weights_dir: Path, metrics: Iterable[str], fid_size: int = 299, fid_resize: str = "legacy"
) -> Backbones:
    """Verify (sha256) then load the roles ``metrics`` need from ``weights_dir``; never downloads.

    FID always runs the standard Inception at 299 (``fid_size`` is ignored with real weights);
    ``fid_resize`` is ``legacy`` (torch-fidelity / torchmetrics) or ``clean`` (clean-fid).
    """
    from ultraflux_eval.inception import INPUT_SIDE, RESIZE_MODES, load_standard_inception

    if fid_resize not in RESIZE_MODES:
        raise EvalError(f"fid resize must be one of {list(RESIZE_MODES)}, got {fid_resize!r}")
    del fid_size  # the standard network's input side is fixed
    weights_dir = Path(weights_dir)
    roles = needed_roles(metrics)
    verify_weights(weights_dir, roles)
    targets = read_manifest(weights_dir)["backbones"]
    out = Backbones(fid_size=INPUT_SIDE, tiny=False, fid_resize=fid_resize)
    for role in roles:
        path = weights_dir / targets[role]
        if role in ("clip", "pickscore", "hps"):
            setattr(out, role, load_clip(path))
        elif role == "aesthetic_head":
            out.aesthetic_head = load_aesthetic_head(path)
        elif role == "inception":
            out.inception = load_standard_inception(path)
        elif role == "musiq":
            from ultraflux_eval.iqa import load_musiq

            out.musiq = load_musiq(path)
        elif role == "hpsv3":
            from ultraflux_eval.hpsv3 import load_hpsv3

            out.hpsv3 = load_hpsv3(path)
        elif role == "qalign":
            from ultraflux_eval.qalign import load_qalign

            out.qalign = load_qalign(path)
        elif role == "artimuse":
            from ultraflux_eval.artimuse import load_artimuse

            out.artimuse = load_artimuse(path)
    return out


def backbones_from_config(
    source: str, weights_dir: Path, metrics: Iterable[str], fid_size: int, fid_resize: str = "legacy"
) -> Backbones:
    """``tiny`` → :func:`tiny_backbones`; ``local`` → :func:`local_backbones` (sha256-verified, offline)."""
    if source == "tiny":
        return tiny_backbones(metrics, fid_size=fid_size)
    if source == "local":
        return local_backbones(weights_dir, metrics, fid_size=fid_size, fid_resize=fid_resize)
    raise EvalError(f"eval.backbones.source must be 'tiny' or 'local', got {source!r}")
