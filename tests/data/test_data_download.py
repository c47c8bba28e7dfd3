"""Safe download against a local HTTP server on 127.0.0.1: good, broken, slow, oversized and redirecting."""

from __future__ import annotations

import io
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from ultraflux_data.config import DataConfig, DownloadConfig
from ultraflux_data.download import _Refused, check_url, download_urls, sniff_image_type, summarise
from ultraflux_data.ingest import ingest, read_manifest


def _png(seed: int, size=(48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


GOOD, OTHER, THIRD = _png(0), _png(1), _png(2)
HITS: Counter[str] = Counter()
# Timeouts without races: the slow URL never answers until the test is over (or 60 s, 20× the client's 3 s read
# timeout), and every other response is immediate — 3 s leaves a busy runner far more than 10× what it needs.
READ_TIMEOUT_S = 3.0
RELEASE_SLOW = threading.Event()
# A trickle lasts TRICKLED × 50 ms = 10 s, 20× the 0.5 s deadline the tests set; a client without a deadline or
# minimum rate gets the whole image after it (status ok), so those tests fail on the reason, not on a clock.
TRICKLED = 200
OTHER_PORT = [0]  # the second service on the mirror's host (fixture `other_service`)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, code: int, body: bytes = b"", ctype: str = "image/png", headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, data: bytes) -> None:
        """Send ``data`` a byte at a time, 50 ms apart (stops early when the test ends)."""
        for i in range(len(data)):
            if RELEASE_SLOW.wait(0.05):
                break
            self.wfile.write(data[i : i + 1])
            self.wfile.flush()

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        path = self.path
        HITS[path] += 1
        port = self.server.server_address[1]
        if path in ("/good.png", "/copy.png"):
            self._send(200, GOOD)
        elif path == "/other.png":
            self._send(200, OTHER, ctype="image/png; charset=binary")
        elif path == "/page.html":
            self._send(200, b"<html></html>", ctype="text/html")
        elif path == "/fake.png":
            self._send(200, b"definitely not a png file", ctype="image/png")
        elif path == "/missing.png":
            self._send(404, b"no")
        elif path == "/always500.png":
            self._send(500, b"boom")
        elif path == "/flaky.png":
            if HITS[path] <= 2:
                self._send(503, b"busy")
            else:
                self._send(200, THIRD)
        elif path == "/declared-big.png":
            self._send(200, GOOD + b"\0" * 5000)
        elif path == "/streamed-big.png":  # no Content-Length: the limit must hold while streaming
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(GOOD + b"\0" * 5000)
        elif path == "/truncated.png":  # promises more bytes than it sends, then hangs up
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(GOOD) + 500))
            self.end_headers()
            self.wfile.write(GOOD[:100])
        elif path == "/slow.png":
            RELEASE_SLOW.wait(20 * READ_TIMEOUT_S)
            self._send(200, GOOD)
        elif path == "/redirect-good":
            self._send(302, headers={"Location": "/good.png"})
        elif path == "/redirect-ftp":
            self._send(302, headers={"Location": "ftp://example.org/x.png"})
        elif path == "/redirect-file":
            self._send(301, headers={"Location": "file:///etc/passwd"})
        elif path == "/redirect-private":
            self._send(307, headers={"Location": "http://10.1.2.3/x.png"})
        elif path == "/redirect-localhost":  # same machine, but not the allowed host name
            self._send(302, headers={"Location": f"http://localhost:{port}/good.png"})
        elif path == "/redirect-loop":
            self._send(302, headers={"Location": "/redirect-loop"})
        elif path == "/redirect-other-port":  # the allowed mirror points at another service of its host
            self._send(302, headers={"Location": f"http://127.0.0.1:{OTHER_PORT[0]}/api/2.0/mlflow/runs/search"})
        elif path == "/trickle-body.png":  # headers at once, then the first 200 bytes one every 50 ms
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(GOOD)))
            self.end_headers()
            self._trickle(GOOD[:TRICKLED])
            self.wfile.write(GOOD[TRICKLED:])
        elif path == "/trickle-headers.png":  # the status line and headers one byte every 50 ms
            head = (f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(GOOD)}\r\n"
                    f"X-Pad: {'a' * TRICKLED}\r\n\r\n").encode()
            self._trickle(head)
            self.wfile.write(GOOD)
        else:
            self._send(404)


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # clients hanging up early is part of the test
        pass


@pytest.fixture(scope="module")
def server():
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RELEASE_SLOW.clear()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    RELEASE_SLOW.set()  # let a handler still waiting on the slow URL finish before the server stops
    httpd.shutdown()
    httpd.server_close()


def _cfg(server: str, **kw) -> DownloadConfig:
    base = dict(private_hosts=(server.removeprefix("http://"),), retries=2, backoff_s=0.01, connect_timeout_s=10.0,
                read_timeout_s=READ_TIMEOUT_S,
                max_bytes=len(GOOD) + 1000, concurrency=4, max_redirects=3)
    return DownloadConfig(**{**base, **kw})


def test_outcomes_of_every_kind_of_response(server, tmp_path):
    HITS.clear()
    names = ["good.png", "copy.png", "other.png", "page.html", "fake.png", "missing.png", "always500.png",
             "flaky.png", "declared-big.png", "streamed-big.png", "truncated.png", "slow.png", "redirect-good",
             "redirect-ftp", "redirect-file", "redirect-private", "redirect-localhost", "redirect-loop"]
    results = download_urls([f"{server}/{n}" for n in names], tmp_path, _cfg(server), progress=False)
    by = {url.rsplit("/", 1)[1]: r for url, r in results.items()}
    same = [by[n] for n in ("good.png", "copy.png", "redirect-good")]  # one content behind three URLs
    assert sorted(r.status for r in same) == ["duplicate", "duplicate", "ok"]  # whichever finished first is ok
    assert len({r.path for r in same}) == 1  # content-addressed, stored once
    assert (tmp_path / by["good.png"].path).read_bytes() == GOOD
    assert by["other.png"].status == "ok" and by["other.png"].path.endswith(".png")
    flaky = by["flaky.png"]
    assert flaky.status == "ok" and flaky.attempts == 3 and HITS["/flaky.png"] == 3
    expected = {
        "page.html": "content type 'text/html'",
        "fake.png": "magic bytes",
        "missing.png": "HTTP 404",
        "always500.png": "gave up: HTTP 500",
        "declared-big.png": "declared",
        "streamed-big.png": "exceeds max_bytes",
        "truncated.png": "gave up: connection error",
        "slow.png": "gave up: timeout",
        "redirect-ftp": "scheme 'ftp'",
        "redirect-file": "scheme 'file'",
        "redirect-private": "non-public address 10.1.2.3",
        "redirect-localhost": "non-public address",
        "redirect-loop": "more than 3 redirects",
    }
    for name, reason in expected.items():
        assert by[name].status == "failed" and reason in by[name].reason, (name, by[name].reason)
    assert HITS["/always500.png"] == 3 and HITS["/missing.png"] == 1  # retries only for transient errors
    assert not list(tmp_path.glob("*.part"))  # failures leave nothing half-written
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png") == sorted(
        {by["good.png"].path, by["other.png"].path, flaky.path})
    assert summarise(results) == {"ok": 3, "duplicate": 2, "failed": 13}


def test_loopback_is_refused_unless_allowed(server, tmp_path):
    HITS.clear()
    url = f"{server}/good.png"
    blocked = download_urls([url], tmp_path / "a", DownloadConfig(retries=0), progress=False)[url]
    assert blocked.status == "failed" and "non-public address 127.0.0.1" in blocked.reason
    assert HITS["/good.png"] == 0  # refused before connecting
    allowed = download_urls([url], tmp_path / "b", DownloadConfig(allow_private=True), progress=False)[url]
    assert allowed.status == "ok"


@pytest.mark.parametrize("url", ["http://127.0.0.1/x", "http://localhost/x", "http://10.0.0.1/x",
                                 "http://192.168.1.1/x", "http://169.254.169.254/latest", "http://[::1]/x",
                                 "http://[fe80::1]/x", "http://0.0.0.0/x", "http://224.0.0.1/x"])
def test_non_public_addresses_are_refused(url):
    with pytest.raises(_Refused, match="non-public"):
        check_url(url, allow_private=False)
    check_url(url, allow_private=True)


@pytest.mark.parametrize("url", ["ftp://example.org/a.png", "file:///etc/passwd", "data:image/png;base64,AAAA",
                                 "gopher://x", "http:///nohost"])
def test_other_schemes_are_refused(url):
    with pytest.raises(_Refused):
        check_url(url, allow_private=True)


def test_resume_skips_finished_urls_and_retries_failed_ones(server, tmp_path):
    HITS.clear()
    urls = [f"{server}/good.png", f"{server}/missing.png"]
    download_urls(urls, tmp_path, _cfg(server), progress=False)
    from filelock import FileLock

    partial = tmp_path / ".partial"
    for writer in ("111-dead", "222-live"):  # a killed run's partial folder and a running one's
        (partial / writer).mkdir()
        (partial / writer / "x.part").write_bytes(b"half")
    (partial / "111-dead.lock").touch()  # its lock file stays behind, unlocked: the process died
    live = FileLock(str(partial / "222-live.lock"))
    live.acquire()
    with open(tmp_path / "downloads.jsonl", "a") as fh:
        fh.write('{"url": "cut by a kill')  # torn last line
    again = download_urls(urls, tmp_path, _cfg(server), progress=False)
    assert HITS["/good.png"] == 1 and HITS["/missing.png"] == 2
    assert again[urls[0]].status == "ok" and again[urls[1]].status == "failed"
    assert not (partial / "111-dead").exists()  # the dead writer's partial file is removed
    assert (partial / "222-live" / "x.part").read_bytes() == b"half"  # another live run's is never touched
    live.release()
    assert sorted(p.name for p in partial.iterdir()) == ["222-live", "222-live.lock"]  # ours are cleaned up


def test_magic_bytes():
    assert sniff_image_type(GOOD) == "png"
    assert sniff_image_type(b"\xff\xd8\xff\xe0....") == "jpg"
    assert sniff_image_type(b"RIFF\0\0\0\0WEBPVP8 ") == "webp"
    assert sniff_image_type(b"<html>") is None


def test_ingest_of_a_metadata_file_with_urls(server, tmp_path):
    local = tmp_path / "local.png"
    local.write_bytes(_png(5, (64, 64)))
    rows = [
        {"image_url": f"{server}/good.png", "caption_en": "noise", "qalign_score": 4.2, "license": "cc0"},
        {"url": f"{server}/missing.png", "caption": "gone"},
        {"image_url": "local.png", "caption_en": "a local file"},
        {"image_url": f"file://{local}", "caption_en": "the same local file"},
        {"image_url": "s3://bucket/key.png"},
        {"caption_en": "no location"},
    ]
    meta = tmp_path / "meta.jsonl"
    meta.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(download=_cfg(server), ingest={"min_side": 32})
    summary = ingest(meta, tmp_path / "out", cfg, progress=False)
    manifest = read_manifest(tmp_path / "out", ok_only=False)
    assert summary.total == len(rows) == len(manifest)
    by_source = {row["source"]: row for _, row in manifest.iterrows()}
    good = by_source[f"{server}/good.png"]
    assert good["status"] == "ok" and good["qalign_score"] == 4.2 and json.loads(good["extra"]) == {"license": "cc0"}
    assert good["caption_en"] == "noise" and (tmp_path / "out" / good["path"]).is_file()
    assert "download failed: HTTP 404" in by_source[f"{server}/missing.png"]["reason"]
    assert by_source["local.png"]["status"] == "ok"
    assert by_source[f"file://{local}"]["reason"].startswith("duplicate")
    assert "unsupported URL scheme" in by_source["s3://bucket/key.png"]["reason"]
    assert "no image_url" in by_source["meta.jsonl:row6"]["reason"]
    assert summary.ok == 2 and summary.quarantined == 4
    assert isinstance(manifest, pd.DataFrame)


@pytest.fixture(scope="module")
def other_service():
    """Another HTTP service on the same host as the allowed mirror (as MLflow was, in issue 19)."""
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    OTHER_PORT[0] = httpd.server_address[1]
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("path", ["trickle-body.png", "trickle-headers.png"])
def test_a_server_trickling_bytes_is_cut_at_the_deadline(server, tmp_path, path):
    url = f"{server}/{path}"
    result = download_urls([url], tmp_path, _cfg(server, deadline_s=0.5, min_rate_bytes_s=0), progress=False)[url]
    assert result.status == "failed" and result.reason.startswith("deadline: not done within deadline_s=0.5")
    assert result.attempts == 1  # the deadline covers every attempt: no retry after it


def test_a_body_below_the_minimum_rate_is_aborted(server, tmp_path):
    url = f"{server}/trickle-body.png"
    # ≤ 20 B/s while trickling, but the whole body averages above 100 B/s: only a rate checked as bytes arrive
    # (not once a buffer fills or the body ends) refuses it.
    assert len(GOOD) / (TRICKLED * 0.05) > 2 * 100
    cfg = _cfg(server, deadline_s=600, min_rate_bytes_s=100, min_rate_grace_s=0.2)
    result = download_urls([url], tmp_path, cfg, progress=False)[url]
    assert result.status == "failed" and result.reason.startswith("too slow: "), result.reason
    assert "below min_rate_bytes_s=100" in result.reason


def test_private_hosts_admit_one_port_not_the_whole_host(server, other_service, tmp_path):
    HITS.clear()
    cfg = _cfg(server, retries=0)
    target = f"{other_service}/api/2.0/mlflow/runs/search"
    results = download_urls([target, f"{server}/redirect-other-port", f"{server}/good.png"], tmp_path, cfg,
                            progress=False)
    assert results[f"{server}/good.png"].status == "ok"  # the listed host:port is allowed
    for url in (target, f"{server}/redirect-other-port"):
        assert results[url].status == "failed" and "non-public address 127.0.0.1" in results[url].reason
    assert HITS["/api/2.0/mlflow/runs/search"] == 0  # the other service was never reached
    with pytest.raises(ValueError, match="is not host:port"):
        DownloadConfig(private_hosts=("127.0.0.1",))


@pytest.mark.parametrize("blocked, public", [
    ("64:ff9b::7f00:1", "64:ff9b::808:808"),  # NAT64 (RFC 6052) of 127.0.0.1 / 8.8.8.8
    ("64:ff9b::a9fe:a9fe", "64:ff9b::101:101"),  # NAT64 of the cloud metadata address 169.254.169.254
    ("2002:7f00:1::", "2002:808:808::"),  # 6to4
    ("2002:a00:1::1", "2002:101:101::1"),  # 6to4 of 10.0.0.1
    ("::7f00:1", "::808:808"),  # IPv4-compatible
    ("::ffff:a9fe:a9fe", "::ffff:808:808"),  # IPv4-mapped
])
def test_ipv6_forms_are_judged_by_the_ipv4_address_they_embed(blocked, public):
    with pytest.raises(_Refused, match="non-public"):
        check_url(f"http://[{blocked}]/x.png", allow_private=False)
    check_url(f"http://[{public}]/x.png", allow_private=False)  # the same form around a public address passes
