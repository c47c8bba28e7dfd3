"""``ultraflux-eval weights fetch``: download every backbone from its hub at a pinned revision, check sha256,
write the manifest that :mod:`ultraflux_eval.backbones` loads from.

Pins (:data:`PINS`): Hugging Face repos at a commit, GitHub release assets at a tag. Integrity, strongest first:
a full ``sha256`` in the pin; else the sha256 prefix that torch-hub style file names carry
(``…-6726825d.pth``); a file with neither is recorded on first fetch (trust on first use) and verified from then
on by the manifest. A repo without a known commit (``revision=None``) is fetched only with ``allow_unpinned``, and
the resolved commit is written to the manifest's ``sources:`` so the next fetch can be pinned to it.

Safetensors wherever upstream publishes them; the pickled checkpoints (torch-fidelity's Inception, pyiqa's MUSIQ,
LAION's aesthetic head) are only ever read with ``weights_only=True``.

Transports: :class:`RemoteHub` (``huggingface_hub.hf_hub_download``, plain HTTPS for release assets) and
:class:`LocalHub`, a folder laid out like the hubs (``hf/<repo>/<revision>/<file>``, ``url/<file name>``) — the
same fetch code runs against it in tests and on air-gapped machines.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml

from ultraflux_eval.backbones import MANIFEST, METRIC_ROLES, read_manifest, sha256_file, write_manifest
from ultraflux_eval.checkpoints import shard_names
from ultraflux_eval.errors import EvalError

# what transformers 5 loads a CLIP tokenizer + image processor from (the fast tokenizer's tokenizer.json)
CLIP_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                        "preprocessor_config.json")


@dataclass(frozen=True)
class Pin:
    """One backbone: where it comes from and which files make it up."""

    role: str
    kind: str  # "hf" (Hugging Face repo) or "url" (release asset; `repo` is the URL folder)
    repo: str
    files: tuple[str, ...]
    revision: str | None  # HF commit / release tag; None = not pinned yet
    dest: str  # file or folder of the weights dir the role loads
    sha256: tuple[tuple[str, str], ...] = ()  # (file, full sha256) where known
    optional: tuple[str, ...] = ()  # files taken when the repo has them (tokenizer variants differ between repos)
    # a sharded checkpoint: the first of these index files the repo has; every shard its weight_map names is fetched
    index: tuple[str, ...] = ()

    def target(self, name: str) -> str:
        """Where ``name`` lands in the weights dir."""
        return self.dest if len(self.files) == 1 and not self.dest.endswith("/") else f"{self.dest.rstrip('/')}/{name}"


class MissingFile(EvalError):
    """The hub has no such file in the pinned repo/revision."""


PINS: tuple[Pin, ...] = (
    Pin("inception", "url", "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0",
        ("weights-inception-2015-12-05-6726825d.pth",), "v0.2.0",
        "inception/weights-inception-2015-12-05-6726825d.pth"),
    # commit as pinned in public code that loads this model (the hub's history keeps it)
    Pin("clip", "hf", "openai/clip-vit-base-patch16", ("config.json", "model.safetensors", *CLIP_TOKENIZER_FILES),
        "57c216476eefef5ab752ec549e440a49ae4ae5f3", "clip/"),
    Pin("pickscore", "hf", "yuvalkirstain/PickScore_v1", ("config.json", "model.safetensors"), None, "pickscore/"),
    # PickScore's processor and tokenizer are those of the CLIP-H it was fine-tuned from
    Pin("pickscore", "hf", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", CLIP_TOKENIZER_FILES, None, "pickscore/"),
    Pin("musiq", "hf", "chaofengc/IQA-PyTorch-Weights", ("musiq_koniq_ckpt-e95806b9.pth",), None,
        "musiq/musiq_koniq_ckpt-e95806b9.pth"),
    Pin("hpsv3", "hf", "MizzenAI/HPSv3", ("HPSv3.safetensors",), None, "hpsv3/"),
    # HPSv3's base: its config and processor (the weights come with HPSv3.safetensors)
    Pin("hpsv3", "hf", "Qwen/Qwen2-VL-7B-Instruct", ("config.json", "preprocessor_config.json", "tokenizer.json",
                                                      "tokenizer_config.json", "chat_template.json"), None, "hpsv3/"),
    # Q-Align's OneAlign (mPLUG-Owl2): LLaMA sentencepiece tokenizer, CLIP preprocessor, sharded weights
    Pin("qalign", "hf", "q-future/one-align", ("config.json", "preprocessor_config.json", "tokenizer_config.json"),
        None, "qalign/", optional=("tokenizer.model", "tokenizer.json", "special_tokens_map.json"),
        index=("model.safetensors.index.json", "pytorch_model.bin.index.json")),
    # ArtiMuse (InternVL3-8B layout): Qwen2 tokenizer with the <img>/<IMG_CONTEXT> tokens, safetensors shards
    Pin("artimuse", "hf", "Thunderbolt215215/ArtiMuse", ("config.json", "tokenizer_config.json"), None, "artimuse/",
        optional=("tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"),
        index=("model.safetensors.index.json",)),
)


class Hub(Protocol):
    def download(self, pin: Pin, name: str, into: Path) -> Path:
        """Put file ``name`` of ``pin`` under ``into``; return its path."""
        ...

    def resolved_revision(self, pin: Pin) -> str | None:
        """The commit a pin's files came from (None when the hub cannot tell)."""
        ...


class LocalHub:
    """A folder with the hubs' layout: ``hf/<repo>/<revision or main>/<file>`` and ``url/<file>``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise EvalError(f"weights source {self.root} is not a folder")

    def _path(self, pin: Pin, name: str) -> Path:
        if pin.kind == "url":
            return self.root / "url" / name
        return self.root / "hf" / pin.repo / (pin.revision or "main") / name

    def download(self, pin: Pin, name: str, into: Path) -> Path:
        source = self._path(pin, name)
        if not source.is_file():
            raise MissingFile(f"{source} is missing from the local weights source")
        out = into / name
        shutil.copyfile(source, out)
        return out

    def resolved_revision(self, pin: Pin) -> str | None:
        return pin.revision or "main"


class RemoteHub:
    """The real hubs: ``hf_hub_download`` at the pinned commit, HTTPS for release assets (bounded timeouts)."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self._resolved: dict[str, str] = {}

    def download(self, pin: Pin, name: str, into: Path) -> Path:
        if pin.kind == "url":
            import urllib.request

            import urllib.error

            out = into / name
            try:
                with urllib.request.urlopen(f"{pin.repo}/{name}", timeout=self.timeout_s) as response, \
                        open(out, "wb") as handle:
                    shutil.copyfileobj(response, handle)
            except urllib.error.HTTPError as err:
                if err.code == 404:
                    raise MissingFile(f"{pin.repo}/{name} does not exist (HTTP 404)") from err
                raise
            return out
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = Path(hf_hub_download(pin.repo, name, revision=pin.revision, cache_dir=into / ".hf-cache"))
        except EntryNotFoundError as err:
            raise MissingFile(f"{pin.repo}@{pin.revision or 'main'} has no file {name}") from err
        # the cache path is .../snapshots/<commit>/<name>: the commit `main` resolved to
        self._resolved[pin.repo] = path.parent.name
        return path

    def resolved_revision(self, pin: Pin) -> str | None:
        return pin.revision if pin.kind == "url" else self._resolved.get(pin.repo, pin.revision)


def pins_for(metrics: Iterable[str] | None, pins: tuple[Pin, ...] = PINS) -> list[Pin]:
    """Pins (of ``pins``) of the roles ``metrics`` need (every pin when None)."""
    if metrics is None:
        return list(pins)
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRIC_ROLES]
    if unknown:
        raise EvalError(f"no downloadable backbone for {unknown}; metrics with weights: {sorted(METRIC_ROLES)}")
    roles = {role for m in metrics for role in METRIC_ROLES[m]}
    missing = sorted(roles - {p.role for p in pins})
    if missing:
        raise EvalError(f"no pinned source for backbones {missing}: place their files by hand and run "
                        "`ultraflux-eval weights manifest`")
    return [p for p in pins if p.role in roles]


def _hand_list(pins: Iterable[Pin], weights_dir: Path) -> str:
    lines = []
    for pin in pins:
        where = f"https://huggingface.co/{pin.repo}/resolve/{pin.revision or 'main'}" if pin.kind == "hf" else pin.repo
        lines += [f"{where}/{name}  ->  {Path(weights_dir) / pin.target(name)}" for name in pin.files]
        lines += [f"{where}/{name}  ->  {Path(weights_dir) / pin.target(name)}  (if the repo has it)"
                  for name in pin.optional]
        if pin.index:
            lines.append(f"{where}/{' or '.join(pin.index)} and every shard its weight_map names  ->  "
                         f"{Path(weights_dir) / pin.dest}")
    return "\n  ".join(lines)


def check_online(pins: list[Pin], weights_dir: Path, timeout_s: float = 3.0) -> None:
    """Refuse at once when offline (``HF_HUB_OFFLINE=1`` or no route to the hubs), listing files to place."""
    reason = None
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        reason = "HF_HUB_OFFLINE is set"
    else:
        hosts = {"huggingface.co"} | {re.sub(r"^https?://([^/]+).*$", r"\1", p.repo) for p in pins if p.kind == "url"}
        for host in sorted(hosts):
            try:
                socket.create_connection((host, 443), timeout=timeout_s).close()
            except OSError as err:
                reason = f"{host} is unreachable ({err})"
                break
    if reason:
        raise EvalError(
            f"cannot fetch eval weights: {reason}. Place these files by hand, then run "
            f"`ultraflux-eval weights manifest {weights_dir}` with the --backbone roles:\n  "
            + _hand_list(pins, weights_dir)
        )


def _check_sha(pin: Pin, name: str, path: Path) -> str:
    digest = sha256_file(path)
    full = dict(pin.sha256).get(name)
    if full is not None and digest != full:
        raise EvalError(f"{pin.repo}/{name}: sha256 {digest} != pinned {full}; refusing it")
    prefix = re.search(r"-([0-9a-f]{8,})\.\w+$", name)  # torch-hub convention: the name carries a sha256 prefix
    if full is None and prefix and not digest.startswith(prefix.group(1)):
        raise EvalError(f"{pin.repo}/{name}: sha256 {digest} does not start with {prefix.group(1)}; refusing it")
    return digest


def _fetch_one(pin: Pin, name: str, hub: Hub, weights_dir: Path, known: dict[str, str], tmp: Path) -> Path:
    """Put ``name`` of ``pin`` in place (kept when the manifest already has it with the same sha256)."""
    final = weights_dir / pin.target(name)
    if final.is_file() and known.get(pin.target(name)) == sha256_file(final):
        return final
    got = hub.download(pin, name, tmp)
    _check_sha(pin, name, got)
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = final.with_name(final.name + ".part")
    shutil.copyfile(got, staged)
    os.replace(staged, final)  # a killed fetch never leaves a half-written weights file
    return final


def _shard_names(pin: Pin, hub: Hub, weights_dir: Path, known: dict[str, str], tmp: Path) -> list[str]:
    """Fetch the first index file of ``pin.index`` the repo has; return the shard files it names."""
    for index in pin.index:
        try:
            path = _fetch_one(pin, index, hub, weights_dir, known, tmp)
        except MissingFile:
            continue
        return shard_names(path)
    raise EvalError(f"{pin.repo}@{pin.revision or 'main'} has none of the checkpoint indexes {list(pin.index)}")


def fetch_weights(
    weights_dir: Path,
    metrics: Iterable[str] | None = None,
    hub: Hub | None = None,
    allow_unpinned: bool = False,
    pins: Iterable[Pin] = PINS,
) -> Path:
    """Fetch the backbones ``metrics`` need (all when None) into ``weights_dir`` and (re)write its manifest.

    Files already present with the manifest's sha256 are kept. Returns the manifest path.
    """
    weights_dir = Path(weights_dir)
    pins = pins_for(metrics, tuple(pins))
    unpinned = sorted({p.repo for p in pins if p.revision is None})
    if unpinned and not allow_unpinned:
        raise EvalError(f"{unpinned} have no pinned commit yet: rerun with --allow-unpinned to fetch `main` "
                        "(the resolved commit is recorded in the manifest's `sources:`)")
    if hub is None:
        check_online(pins, weights_dir)
        hub = RemoteHub()
    weights_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = weights_dir / MANIFEST
    old = read_manifest(weights_dir) if manifest_path.is_file() else {"files": {}, "backbones": {}}
    sources = dict(old.get("sources", {}))
    with tempfile.TemporaryDirectory(dir=weights_dir, prefix=".fetch-") as tmp:
        for pin in pins:
            for name in pin.files:
                _fetch_one(pin, name, hub, weights_dir, old["files"], Path(tmp))
            for name in pin.optional:
                try:
                    _fetch_one(pin, name, hub, weights_dir, old["files"], Path(tmp))
                except MissingFile:
                    continue
            if pin.index:
                for name in _shard_names(pin, hub, weights_dir, old["files"], Path(tmp)):
                    _fetch_one(pin, name, hub, weights_dir, old["files"], Path(tmp))
            sources[f"{pin.role}:{pin.repo}"] = hub.resolved_revision(pin)
    backbones = dict(old.get("backbones", {}))
    backbones.update({p.role: p.dest.rstrip("/") for p in pins})
    path = write_manifest(weights_dir, backbones)
    data = yaml.safe_load(path.read_text())
    data["sources"] = sources
    path.write_text(yaml.safe_dump(data, sort_keys=True))
    return path
