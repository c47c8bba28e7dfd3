"""The data flow end to end on a real (ephemeral) Prefect API: metadata with URLs served from 127.0.0.1,
download task, every stage, and the summary artifact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import REPO, REPO_PATH

# Child processes import this checkout's packages (not whatever an editable install points at), so a mutated
# copy of the repository (tests/mutations) is what the flows run.
DRIVER = """
import functools, json, sys, threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from ultraflux_data.synthetic import write_synthetic_dataset

args = json.loads(sys.argv[1])
src = write_synthetic_dataset(args["src"], n=6, seed=1, base_side=160)
handler = functools.partial(SimpleHTTPRequestHandler, directory=str(src))
handler.log_message = lambda *a: None
httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
threading.Thread(target=httpd.serve_forever, daemon=True).start()
port = httpd.server_address[1]
rows = [json.loads(line) for line in (src / "metadata.jsonl").read_text().splitlines()]
with open(args["meta"], "w") as fh:
    for row in rows:
        url = f"http://127.0.0.1:{port}/{row['file_name']}"
        fh.write(json.dumps({"image_url": url, "caption": row["caption_en"]}) + "\\n")

from flows.data_flow import data_flow
from prefect.client.orchestration import get_client

results = data_flow(overrides=[
    f"data.source={args['meta']}", f"data.root={args['root']}", f"data.download.private_hosts=[127.0.0.1:{port}]",
    "data.download.retries=0", "data.scoring.flat_patch=32", "data.scoring.qalign=none", "data.scoring.aesthetics=none",
    "data.filter.min_qalign=null", "data.filter.min_long_side=128", "data.filter.min_short_side=72",
    f"data.cache.model={args['model']}", "data.cache.max_sequence_length=8",
])
with get_client(sync_client=True) as client:
    artifacts = [a.data for a in client.read_artifacts() if a.key == "data-summary"]
json.dump({"results": results, "artifacts": artifacts}, open(args["result"], "w"), default=str)
httpd.shutdown()
"""


@pytest.mark.slow
def test_data_flow_end_to_end(tmp_path, tiny_checkpoint):
    args = {"src": str(tmp_path / "served"), "meta": str(tmp_path / "meta.jsonl"), "root": str(tmp_path / "data"),
            "model": str(tiny_checkpoint), "result": str(tmp_path / "result.json")}
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": REPO_PATH}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((tmp_path / "result.json").read_text())
    results = out["results"]
    # 17 files: the duplicate is stored once, the text file served as image/jpeg fails the magic-byte check;
    # the truncated JPEG downloads fine (valid magic) and is quarantined by ingest.
    assert results["download"] == {"ok": 15, "duplicate": 1, "failed": 1}
    ingest = results["ingest"]
    assert ingest["total"] == 17 and ingest["ok"] == 13
    assert ingest["reasons"] == {"download failed": 1, "duplicate": 1, "tiny": 1, "corrupt": 1}
    assert results["cache"]["entries"] == results["shard"]["samples"] == results["filter"]["subsets"]["train"] > 0
    assert len(out["artifacts"]) == 1
    table = out["artifacts"][0]
    assert "| download | ok: 15, duplicate: 1, failed: 1 |" in table and "| cache | entries:" in table
    assert (Path(args["root"]) / "ingest" / "downloads" / "downloads.jsonl").is_file()



def test_prefect_yaml_declares_the_data_deployment():
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployment = next(d for d in spec["deployments"] if d["name"] == "data-pipeline")
    flow = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
    assert flow.name == "ultraflux-data"
    assert set(deployment["parameters"]) <= set(flow.parameters.properties)
