"""Safe, resumable download of image URLs.

Rules (all in :class:`~ultraflux_data.config.DownloadConfig`): http and https only; every hop of a redirect
chain is checked again (scheme, and every address the host resolves to must be public unless
``allow_private`` or its ``host:port`` is in ``private_hosts``; an IPv6 address that embeds an IPv4 one (mapped,
compatible, 6to4, NAT64) must be public as that IPv4 address too); connect and read timeouts, an overall
``deadline_s`` per URL (all attempts, enforced on every socket read and write, so a server trickling bytes cannot
hold a worker) and a ``min_rate_bytes_s`` after ``min_rate_grace_s``; a byte limit enforced on
``Content-Length`` and while streaming;
an allowed ``Content-Type`` list plus a magic-byte check of the body; retries with exponential backoff on
connection errors, timeouts, 429 and 5xx only; atomic writes (``.part`` then ``os.replace``); files named by
the sha256 of their content, so identical images from different URLs are stored once.

Resume: every finished URL is appended to ``downloads.jsonl`` in the output folder (under a file lock, so
concurrent runs and Ray tasks append whole lines); a second run skips URLs already stored (``ok``/``duplicate``)
and retries the failed ones. Partial files live in a folder per writer (``.partial/<pid>-<random>/``) guarded by
that writer's lock: a run removes only folders whose owner is gone, never another live run's partial files.

Scale-out: URLs are cut into partitions (hash ranges of the URL) that ``ultraflux_data.compute`` runs in this
process or as Ray tasks, each with its own HTTP client and ``concurrency`` threads.

Limitation: the address check resolves the host just before connecting; a DNS server that answers
differently on the second lookup (DNS rebinding) is not prevented. Environment proxies are ignored
(``trust_env=False``) because a proxy would connect on our behalf and bypass the address check.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx
from filelock import FileLock, Timeout
from pydantic import BaseModel

from ultraflux_data.compute import map_partitions
from ultraflux_data.config import ComputeConfig, DownloadConfig, host_port
from ultraflux_data.partitions import partition_of

STATE_FILE = "downloads.jsonl"
_REDIRECTS = (301, 302, 303, 307, 308)
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
    (b"BM", "bmp"),
)


class DownloadResult(BaseModel):
    """Outcome of one URL. ``path`` is relative to the download folder."""

    url: str
    status: Literal["ok", "duplicate", "failed"]
    path: str | None = None
    sha256: str | None = None
    bytes: int = 0
    attempts: int = 0
    reason: str = ""


class _Refused(Exception):
    """Permanent failure: retrying cannot help (bad scheme, blocked address, 404, wrong type, too large)."""


class _Transient(Exception):
    """Worth another attempt (timeouts, dropped connections, 429, 5xx)."""


def sniff_image_type(head: bytes) -> str | None:
    """File extension for the image format whose magic bytes start ``head``, else ``None``."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    for magic, ext in _MAGIC:
        if head.startswith(magic):
            return ext
    return None


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries, for the forms that reach it: IPv4-mapped (``::ffff:a.b.c.d``),
    IPv4-compatible (``::a.b.c.d``), 6to4 (``2002:AABB:CCDD::/48``) and NAT64 (``64:ff9b::a.b.c.d``, RFC 6052)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    value = int(address)
    if value >> 32 in (0, 0x0064_FF9B_0000_0000_0000_0000):  # ::/96 (compatible) or 64:ff9b::/96 (NAT64)
        return ipaddress.IPv4Address(value & 0xFFFF_FFFF)
    return None


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable and not multicast; an IPv6 address that embeds an IPv4 one is judged by that too."""
    if not address.is_global or address.is_multicast:
        return False
    inner = embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
    return inner is None or is_public(inner)


def check_url(url: str, allow_private: bool, private_hosts: tuple[str, ...] = ()) -> None:
    """Raise ``_Refused`` unless ``url`` is http(s) and resolves only to public addresses (unless
    ``allow_private``, or its ``host:port`` is listed in ``private_hosts``: a mirror on one port, not every
    service of its host)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise _Refused(f"scheme {parts.scheme or '(none)'!r} is not allowed (http/https only)")
    host = parts.hostname
    if not host:
        raise _Refused("URL has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        raise _Refused(f"bad port in {url!r}") from err
    if allow_private or (host.lower(), port) in {host_port(entry) for entry in private_hosts}:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise _Transient(f"cannot resolve {host}: {err}") from err
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if not is_public(address):
            raise _Refused(
                f"{host} resolves to non-public address {address} (loopback/private/link-local, also embedded in "
                "IPv6, are blocked; list host:port in data.download.private_hosts or set allow_private=true)"
            )


class _Deadline(threading.local):
    """The monotonic time by which this thread's current URL must be done (``None``: no URL in progress)."""

    at: float | None = None


_DEADLINE = _Deadline()


def _bounded(timeout: float | None, error: type[Exception]) -> float | None:
    """``timeout`` cut to what is left of the current URL's deadline; ``error`` once nothing is left."""
    if _DEADLINE.at is None:
        return timeout
    left = _DEADLINE.at - time.monotonic()
    if left <= 0:
        raise error("the URL's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every read, write and TLS handshake waits at most until the URL's deadline: a server
    that trickles its headers or body byte by byte cannot keep a worker past it (per-read timeouts reset on every
    byte)."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname,
                                                      _bounded(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.SyncBackend):
    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        timeout = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(super().connect_tcp(host, port, timeout, local_address, socket_options))


def _client(cfg: DownloadConfig) -> httpx.Client:
    """An HTTP client whose sockets honour the per-URL deadline (``_DeadlineBackend``)."""
    timeout = httpx.Timeout(cfg.read_timeout_s, connect=cfg.connect_timeout_s)
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    transport = httpx.HTTPTransport(limits=limits, trust_env=False)
    pool = transport._pool  # httpx has no public hook for httpcore's network backend
    if not isinstance(pool, httpcore.ConnectionPool) or not hasattr(pool, "_network_backend"):
        raise RuntimeError("httpx/httpcore changed: the download deadline cannot be installed")
    pool._network_backend = _DeadlineBackend()
    headers = {"user-agent": "ultraflux-data/0.1 (+https://github.com/)"}
    return httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False, headers=headers,
                        transport=transport)


def _fetch_once(client: httpx.Client, url: str, cfg: DownloadConfig, dest: Path) -> tuple[Path, str, int, str]:
    """Stream ``url`` (following checked redirects) into a ``.part`` file in ``dest``.

    Returns ``(part_path, sha256, size, extension)``; the caller renames it.
    """
    current = url
    for _ in range(cfg.max_redirects + 1):
        check_url(current, cfg.allow_private, cfg.private_hosts)
        try:
            with client.stream("GET", current) as response:
                if response.status_code in _REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise _Refused(f"HTTP {response.status_code} redirect without a Location header")
                    current = urljoin(current, location)
                    continue
                if response.status_code == 429 or response.status_code >= 500:
                    raise _Transient(f"HTTP {response.status_code}")
                if response.status_code != 200:
                    raise _Refused(f"HTTP {response.status_code}")
                ctype = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
                if ctype not in cfg.content_types:
                    raise _Refused(f"content type {ctype or '(none)'!r} is not an allowed image type")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > cfg.max_bytes:
                    raise _Refused(f"{declared} bytes declared, more than max_bytes={cfg.max_bytes}")
                return _stream_to_part(response, cfg, dest)
        except httpx.TimeoutException as err:
            if _DEADLINE.at is not None and time.monotonic() >= _DEADLINE.at:
                raise _Refused(f"deadline: not done within deadline_s={cfg.deadline_s}") from err
            raise _Transient(f"timeout: {type(err).__name__}") from err
        except httpx.TransportError as err:
            raise _Transient(f"connection error: {type(err).__name__}: {err}") from err
    raise _Refused(f"more than {cfg.max_redirects} redirects")


def _stream_to_part(response: httpx.Response, cfg: DownloadConfig, dest: Path) -> tuple[Path, str, int, str]:
    max_bytes = cfg.max_bytes
    digest = hashlib.sha256()
    size = 0
    started = time.monotonic()
    head = b""
    fd, name = tempfile.mkstemp(suffix=".part", dir=dest)
    part = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in response.iter_bytes():  # as it arrives (a chunk size would buffer 64 KiB first)
                size += len(chunk)
                if size > max_bytes:
                    raise _Refused(f"body exceeds max_bytes={max_bytes}")
                elapsed = time.monotonic() - started
                if elapsed > cfg.min_rate_grace_s and size < cfg.min_rate_bytes_s * elapsed:
                    raise _Refused(f"too slow: {size} bytes in {elapsed:.1f} s, below "
                                   f"min_rate_bytes_s={cfg.min_rate_bytes_s}")
                if len(head) < 16:
                    head += chunk[: 16 - len(head)]
                digest.update(chunk)
                fh.write(chunk)
        ext = sniff_image_type(head)
        if ext is None:
            raise _Refused("body is not a known image format (magic bytes)")
        return part, digest.hexdigest(), size, ext
    except BaseException:
        part.unlink(missing_ok=True)
        raise


class _Store:
    """The download folder: content-addressed files plus the append-only state file.

    Thread-safe within a process (a lock) and safe across processes (file locks on the state file and on each
    writer's partial folder).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        partial_root = root / ".partial"
        partial_root.mkdir(exist_ok=True)
        self.partial = partial_root / f"{os.getpid()}-{os.urandom(4).hex()}"
        self.partial.mkdir()
        self._own = FileLock(str(self.partial) + ".lock")
        self._own.acquire()
        _remove_orphaned_partials(partial_root, self.partial)
        self._lock = threading.Lock()
        self._state_lock = FileLock(str(root / (STATE_FILE + ".lock")))
        self.done: dict[str, DownloadResult] = {}
        self._hashes: set[str] = set()
        state = root / STATE_FILE
        if state.is_file():
            for line in state.read_text().splitlines():
                try:
                    result = DownloadResult.model_validate_json(line)
                except ValueError:
                    continue  # a line cut by a killed run
                if result.status != "failed" and result.path and (root / result.path).is_file():
                    self.done[result.url] = result
                    self._hashes.add(result.sha256 or "")

    def close(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
        self._own.release()
        Path(self._own.lock_file).unlink(missing_ok=True)

    def commit(self, url: str, part: Path, sha: str, size: int, ext: str, attempts: int) -> DownloadResult:
        name = f"{sha}.{ext}"
        with self._lock:
            duplicate = sha in self._hashes or (self.root / name).is_file()
            if duplicate:
                part.unlink()
            else:
                os.replace(part, self.root / name)  # another process renaming the same content is harmless
                self._hashes.add(sha)
        status = "duplicate" if duplicate else "ok"
        return DownloadResult(url=url, status=status, path=name, sha256=sha, bytes=size, attempts=attempts)

    def record(self, result: DownloadResult) -> None:
        with self._lock, self._state_lock, open(self.root / STATE_FILE, "a") as fh:
            fh.write(result.model_dump_json() + "\n")
            if result.status != "failed":
                self.done[result.url] = result


def _remove_orphaned_partials(partial_root: Path, own: Path) -> None:
    """Remove partial folders whose writer is gone (its lock can be taken); live writers' folders stay."""
    for lock_path in partial_root.glob("*.lock"):
        folder = lock_path.with_suffix("")
        if folder == own:
            continue
        lock = FileLock(str(lock_path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # its writer is alive
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            lock.release()
            lock_path.unlink(missing_ok=True)


def _download_one(client: httpx.Client, url: str, cfg: DownloadConfig, store: _Store) -> DownloadResult:
    """One URL, all attempts within ``deadline_s`` (the sockets enforce it: ``_DeadlineStream``)."""
    reason = ""
    _DEADLINE.at = time.monotonic() + cfg.deadline_s
    try:
        for attempt in range(1, cfg.retries + 2):
            try:
                part, sha, size, ext = _fetch_once(client, url, cfg, store.partial)
                return store.commit(url, part, sha, size, ext, attempt)
            except _Refused as err:
                return DownloadResult(url=url, status="failed", attempts=attempt, reason=str(err))
            except _Transient as err:
                reason = str(err)
                if attempt <= cfg.retries:
                    delay = cfg.backoff_s * 2 ** (attempt - 1)
                    if time.monotonic() + delay >= _DEADLINE.at:
                        return DownloadResult(url=url, status="failed", attempts=attempt, reason=(
                            f"deadline: not done within deadline_s={cfg.deadline_s} (last error: {reason})"))
                    time.sleep(delay)
        return DownloadResult(url=url, status="failed", attempts=cfg.retries + 1, reason=f"gave up: {reason}")
    finally:
        _DEADLINE.at = None


@dataclass(frozen=True)
class DownloadWorker:
    """Downloads one partition of URLs (the compute engine's worker) with its own client and thread pool."""

    out: Path
    cfg: DownloadConfig

    def __call__(self, urls: list[str]) -> list[DownloadResult]:
        cfg, store = self.cfg, _Store(self.out)
        client = _client(cfg)
        results = []
        try:
            with client, ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
                for result in pool.map(lambda u: _download_one(client, u, cfg, store), urls):
                    store.record(result)
                    results.append(result)
        finally:
            store.close()
        return results


def download_urls(urls: Iterable[str], out_dir: Path | str, cfg: DownloadConfig | None = None,
                  progress: bool = True, compute: ComputeConfig | None = None) -> dict[str, DownloadResult]:
    """Download every distinct URL into ``out_dir``; returns URL → result (previous runs' results included).

    Never raises for a bad URL or response: failures come back with ``status="failed"`` and a reason.
    """
    cfg, compute = cfg or DownloadConfig(), compute or ComputeConfig()
    out = Path(out_dir).resolve()  # absolute: Ray workers may run elsewhere
    store = _Store(out)  # reads the state of previous runs
    store.close()
    unique = list(dict.fromkeys(urls))
    todo = [u for u in unique if u not in store.done]
    results: dict[str, DownloadResult] = {u: store.done[u] for u in unique if u in store.done}
    count = max(1, -(-len(todo) // compute.partition_size))
    groups: dict[int, list[str]] = {}
    for url in todo:
        groups.setdefault(partition_of(hashlib.sha256(url.encode()).hexdigest(), count), []).append(url)
    partitions = [groups[i] for i in sorted(groups)]
    for batch in map_partitions(functools.partial(DownloadWorker, out, cfg), partitions, compute, desc="download",
                                progress=progress):
        results.update({r.url: r for r in batch})
    return {u: results[u] for u in unique}


def listed_urls(source: Path) -> list[str]:
    """The http(s) URLs a source lists: a ``.txt`` file (one URL per line) or a metadata file's ``image_url``s."""
    from ultraflux_data.metadata import read_metadata

    source = Path(source)
    if source.suffix == ".txt":
        urls = [line.strip() for line in source.read_text().splitlines() if line.strip()]
    else:
        urls = [r.location for r in read_metadata(source)[0] if r.location]
    return [u for u in urls if u.startswith(("http://", "https://"))]


def summarise(results: dict[str, DownloadResult]) -> dict[str, int]:
    """Counts per status, for logs and flow artifacts."""
    counts = {"ok": 0, "duplicate": 0, "failed": 0}
    for result in results.values():
        counts[result.status] += 1
    return counts

