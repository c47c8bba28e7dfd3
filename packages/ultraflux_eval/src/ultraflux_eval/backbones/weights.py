"""The local weights folder of the learned metrics: its ``manifest.yaml`` (written, read, verified by sha256) and
``ultraflux-eval weights fetch``, which fills it from the hubs at pinned revisions.

Production weights live in one directory with a ``manifest.yaml``::

    files:                      # every file, relative to the directory, with its sha256
      clip/config.json: 3f1c...
      clip/model.safetensors: 9a0b...
    backbones:                  # which file or folder each backbone loads from
      clip: clip                # HF CLIPModel folder (CLIP score; features for the aesthetic head)
      aesthetic_head: aesthetic/head.safetensors   # LAION MLP (768-1024-128-64-16-1) on CLIP image embeds
      pickscore: pickscore      # HF CLIPModel folder (PickScore_v1)
      hps: hps                  # HF CLIPModel folder (HPS-style preference model in HF CLIP layout)
      inception: inception/weights-inception-2015-12-05-6726825d.pth  # torch-fidelity's TF-ported Inception
      musiq: musiq/musiq_koniq_ckpt-e95806b9.pth   # pyiqa MUSIQ (KonIQ-10k), read with weights_only=True
      hpsv3: hpsv3                # Qwen2-VL-7B-Instruct config + processor files and HPSv3.safetensors
      qalign: qalign              # q-future/one-align (mPLUG-Owl2): config, tokenizer, preprocessor, shards
      artimuse: artimuse          # Thunderbolt215215/ArtiMuse (InternVL layout): config, tokenizer, shards

Loading never downloads: a missing or altered file is an ``EvalError`` naming it.

Fetching: pins (:data:`~ultraflux_eval.backbones.registry.PINS`) are Hugging Face repos at a commit and GitHub
release assets at a tag. Integrity, strongest first: a full ``sha256`` in the pin; else the sha256 prefix that
torch-hub style file names carry (``…-6726825d.pth``); a file with neither is recorded on first fetch (trust on
first use) and verified from then on by the manifest. A repo without a known commit (``revision=None``) is fetched
only with ``allow_unpinned``, and the resolved commit is written to the manifest's ``sources:`` so the next fetch
can be pinned to it.

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
from pathlib import Path
from typing import Protocol

import yaml
from ultraflux_core.files import file_sha256

from ultraflux_eval.backbones.checkpoints import shard_names
from ultraflux_eval.backbones.registry import PINS, ROLES, Pin, pins_for
from ultraflux_eval.errors import EvalError

MANIFEST = "manifest.yaml"


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
        elif file_sha256(path) != manifest["files"][rel]:
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
        str(p.relative_to(weights_dir)): file_sha256(p)
        for p in sorted(weights_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    path = weights_dir / MANIFEST
    path.write_text(yaml.safe_dump({"files": files, "backbones": backbones}, sort_keys=True))
    return path


def weights_status(roles: tuple[str, ...], weights_dir: Path) -> str:
    """``n/a`` (no backbone), ``present`` (every manifest file of ``roles`` exists; not re-hashed here),
    or ``missing: ...``."""
    if not roles:
        return "n/a"
    if not (Path(weights_dir) / MANIFEST).is_file():
        return "missing: no manifest"
    manifest = read_manifest(weights_dir)
    absent = [r for r in roles if r not in manifest.get("backbones", {}) or not role_files(manifest, r)]
    if absent:
        return f"missing: {', '.join(absent)}"
    files = [f for r in roles for f in role_files(manifest, r)]
    gone = [f for f in files if not (Path(weights_dir) / f).is_file()]
    return f"missing: {len(gone)} files" if gone else "present"


class MissingFile(EvalError):
    """The hub has no such file in the pinned repo/revision."""


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
            import urllib.error
            import urllib.request

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
    digest = file_sha256(path)
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
    if final.is_file() and known.get(pin.target(name)) == file_sha256(final):
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
