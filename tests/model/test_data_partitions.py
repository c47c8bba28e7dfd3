"""Key-range partitions, atomic writes and links: the building blocks of resumable, concurrent-safe stages."""

from __future__ import annotations

import hashlib
import os

import pandas as pd
import pytest
from ultraflux_model.data.partitions import (
    atomic_bytes,
    link_or_copy,
    part_name,
    partition_count,
    partition_of,
    split_by_key,
)


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
