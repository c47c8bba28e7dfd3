"""Key-range partitions, atomic writes and links: the building blocks of resumable, concurrent-safe stages."""

from __future__ import annotations

import hashlib
import os

import pandas as pd
import pytest
from ultraflux_core.files import atomic_bytes, link_or_copy
from ultraflux_data.partitions import part_name, partition_count, partition_of, split_by_key


def _keys(n: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


@pytest.mark.parametrize(("items", "per", "count"), [(0, 4, 1), (4, 4, 1), (5, 4, 2), (17, 4, 8), (64, 1, 64)])
def test_partition_count_is_the_next_power_of_two(items, per, count):
    assert partition_count(items, per) == count


def test_partitions_are_key_ranges_independent_of_input_order():
    keys = _keys(50)
    frame = pd.DataFrame({"key": keys, "value": range(50)})
    count, groups = split_by_key(frame, 8)
    shuffled_count, shuffled = split_by_key(frame.sample(frac=1.0, random_state=3), 8)
    assert count == shuffled_count == 8
    assert [(i, list(g["key"])) for i, g in groups] == [(i, list(g["key"])) for i, g in shuffled]
    for index, group in groups:
        assert list(group["key"]) == sorted(group["key"])
        # range p holds exactly the keys whose top 32 bits lie in [p, p + 1) · 2^32 / count
        assert all(index * 2**32 // count <= int(k[:8], 16) < (index + 1) * 2**32 // count for k in group["key"])
    assert sorted(k for _, g in groups for k in g["key"]) == sorted(keys)
    # doubling the count splits every range in two: a key's new partition is 2p or 2p + 1
    assert all(partition_of(k, 2 * count) // 2 == partition_of(k, count) for k in keys)
    assert part_name(3, 16, "ab", ".parquet") == "p00003of00016-ab.parquet"


def test_atomic_write_leaves_no_temporary_and_link_shares_the_inode(tmp_path):
    target = atomic_bytes(tmp_path / "sub" / "a.bin", b"payload")
    assert target.read_bytes() == b"payload" and os.listdir(target.parent) == ["a.bin"]
    how = link_or_copy(target, tmp_path / "images" / "b.bin")
    assert how == "link" and os.stat(target).st_ino == os.stat(tmp_path / "images" / "b.bin").st_ino
    assert os.listdir(tmp_path / "images") == ["b.bin"]


def test_no_needless_reencoding_ingest_keeps_bytes_and_shards_keep_bucket_sized_bytes(tmp_path):
    """Ingest keeps a plain original by hard link; a shard stores a bucket-sized PNG's own bytes, others re-encoded."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image
    from ultraflux_data.bucketing import add_bucket_columns
    from ultraflux_data.config import ShardConfig
    from ultraflux_data.ingest import ingest, read_manifest
    from ultraflux_data.shards import write_shards

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(src / "exact.png")  # a 256 bucket
    Image.fromarray(rng.integers(0, 256, (300, 250, 3), dtype=np.uint8)).save(src / "other.png")
    ingest(src, tmp_path / "ingest", progress=False)
    manifest = read_manifest(tmp_path / "ingest").set_index("source")
    for name in ("exact.png", "other.png"):
        stored = tmp_path / "ingest" / manifest.loc[name, "path"]
        # The original bytes, never re-encoded; a copy, never the user's inode (issue 19: a hard-linked source edited
        # in place changed a stored file named by its hash).
        assert manifest.loc[name, "stored"] == "copy" and stored.read_bytes() == (src / name).read_bytes()
        assert os.stat(stored).st_ino != os.stat(src / name).st_ino
    rows = add_bucket_columns(manifest.reset_index(), "256")
    summary = write_shards(rows, tmp_path / "ingest", tmp_path / "shards", ShardConfig(), progress=False)
    assert summary.samples == 2 and summary.kept_original == 1
    index = pd.read_parquet(tmp_path / "shards" / "index.parquet").set_index("key")
    exact_key = manifest.loc["exact.png", "key"]
    with tarfile.open(tmp_path / "shards" / index.loc[exact_key, "shard"]) as tar:
        assert tar.extractfile(index.loc[exact_key, "image"]).read() == (src / "exact.png").read_bytes()
    other = index.loc[manifest.loc["other.png", "key"]]
    assert other["stored"] == "encoded" and (other["bucket_width"], other["bucket_height"]) != (250, 300)
    with tarfile.open(tmp_path / "shards" / other["shard"]) as tar:
        image = Image.open(io.BytesIO(tar.extractfile(other["image"]).read()))
        assert image.size == (other["bucket_width"], other["bucket_height"])
