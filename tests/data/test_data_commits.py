"""Data stages commit atomically (issue 19): a killed filter leaves the old subsets whole, a reader never sees a
truncated parquet, bucket refuses an uncommitted upstream, and a second run of a stage refuses."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import threading

import pandas as pd
import pytest
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.files import COMMIT_MARKER, read_committed, uncommitted_siblings
from ultraflux_core.locks import LockHeld, exclusive
from ultraflux_data import stages
from ultraflux_data.config import DataConfig


def _cfg(root, **filter_kw) -> DataConfig:
    return DataConfig.model_validate(
        {
            "root": str(root),
            "filter": {
                "min_long_side": 64,
                "min_short_side": 32,
                "min_qalign": None,
                "aesthetics_top": 0.75,
                "stage2_top": 0.5,
                **filter_kw,
            },
        }
    )


def _seed_upstream(root, n: int = 40) -> None:
    """scores.parquet and an ingest manifest, as score and ingest commit them."""
    keys = [f"{i:064x}" for i in range(n)]
    scores = pd.DataFrame(
        {
            "key": keys,
            "width": [512] * n,
            "height": [256] * n,
            "flat_percentage": [i / (2 * n) for i in range(n)],
            "shannon_entropy": [7.5] * n,
            "qalign_score": [3.0] * n,
            "aesthetics_score": [float(i) for i in range(n)],
        }
    )
    paths = stages.DataPaths(root)
    paths.ingest.mkdir(parents=True)
    scores.to_parquet(paths.scores, index=False)
    scores[["key"]].assign(path=[f"images/{k}.png" for k in keys], caption_en="c", status="ok").to_parquet(
        paths.ingest / "manifest.parquet", index=False
    )


def _consistent(paths: stages.DataPaths) -> tuple[set, set]:
    """train and stage2 of one commit (read as readers should: ``read_committed``); stage2 ⊂ train."""
    files = read_committed(paths.subsets, ["train.parquet", "stage2.parquet"], "ultraflux data filter")
    train = set(pd.read_parquet(io.BytesIO(files["train.parquet"]))["key"])
    stage2 = set(pd.read_parquet(io.BytesIO(files["stage2.parquet"]))["key"])
    assert stage2 <= train
    return train, stage2


def test_filter_killed_between_files_keeps_the_old_subsets_and_bucket_runs_on_them(tmp_path, monkeypatch):
    _seed_upstream(tmp_path)
    paths = stages.DataPaths(tmp_path)
    stages.run_filter(_cfg(tmp_path))
    before = {p.name: p.read_bytes() for p in paths.subsets.iterdir()}
    # The attack: the new run dies after its second file (train.parquet written, stage2.parquet not yet).
    real, calls = pd.DataFrame.to_parquet, []

    def dying(self, path, *a, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed between two files")
        return real(self, path, *a, **kw)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", dying)
    with pytest.raises(KeyboardInterrupt):
        stages.run_filter(_cfg(tmp_path, aesthetics_top=0.25, stage2_top=0.9))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in paths.subsets.iterdir()} == before  # nothing lost, nothing mixed
    _consistent(paths)
    assert not uncommitted_siblings(paths.subsets)
    stages.run_bucket(_cfg(tmp_path))  # the old commit verifies
    assert len(pd.read_parquet(paths.buckets / "assignments.parquet")) == len(_consistent(paths)[0])


def test_filter_sigkilled_mid_stage_leaves_the_commit_intact(tmp_path):
    _seed_upstream(tmp_path)
    paths = stages.DataPaths(tmp_path)
    stages.run_filter(_cfg(tmp_path))
    before = {p.name: p.read_bytes() for p in paths.subsets.iterdir()}
    # A real SIGKILL after the new train.parquet is written: no finally block, no cleanup runs.
    script = textwrap.dedent(f"""
        import os, signal
        import pandas as pd
        from ultraflux_data import stages
        from ultraflux_data.config import DataConfig
        real = pd.DataFrame.to_parquet
        def dying(self, path, *a, **kw):
            real(self, path, *a, **kw)
            if str(path).endswith("train.parquet"):
                os.kill(os.getpid(), signal.SIGKILL)
        pd.DataFrame.to_parquet = dying
        stages.run_filter(DataConfig.model_validate({{"root": {str(tmp_path)!r}, "filter": {{
            "min_long_side": 64, "min_short_side": 32, "min_qalign": None, "aesthetics_top": 0.25}}}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert {p.name: p.read_bytes() for p in paths.subsets.iterdir()} == before
    assert uncommitted_siblings(paths.subsets)  # the dead writer's folder, never read
    stages.run_bucket(_cfg(tmp_path))
    stages.run_filter(_cfg(tmp_path, aesthetics_top=0.25))  # the next run clears it and commits
    assert not uncommitted_siblings(paths.subsets)
    assert len(_consistent(paths)[0]) == 10


@pytest.mark.parametrize("damage", ["no marker", "train rewritten in place", "train truncated"])
def test_bucket_refuses_an_uncommitted_or_changed_upstream(tmp_path, damage):
    _seed_upstream(tmp_path)
    paths = stages.DataPaths(tmp_path)
    stages.run_filter(_cfg(tmp_path))
    if damage == "no marker":  # what an interrupted in-place writer (or an older version) leaves
        (paths.subsets / COMMIT_MARKER).unlink()
    elif damage == "train rewritten in place":
        train = pd.read_parquet(paths.subsets / "train.parquet")
        train.head(3).to_parquet(paths.subsets / "train.parquet", index=False)
    else:
        data = (paths.subsets / "train.parquet").read_bytes()
        (paths.subsets / "train.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(UltraFluxError, match="ultraflux data filter"):
        stages.run_bucket(_cfg(tmp_path))
    assert not (paths.buckets / "assignments.parquet").exists()


def test_a_reader_during_filter_runs_only_sees_whole_committed_files(tmp_path):
    _seed_upstream(tmp_path, n=400)
    paths = stages.DataPaths(tmp_path)
    stages.run_filter(_cfg(tmp_path))
    done, errors, reads = threading.Event(), [], [0]

    def writer() -> None:
        try:
            for i in range(12):
                stages.run_filter(_cfg(tmp_path, aesthetics_top=0.25 + 0.05 * (i % 2)))
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set() or reads[0] == 0:
        try:
            _consistent(paths)
        except Exception as err:  # noqa: BLE001 (any failed read is the finding)
            errors.append(repr(err))
        reads[0] += 1
    thread.join()
    assert not errors, errors[:3]


def test_a_second_concurrent_run_of_a_stage_refuses_naming_the_holder(tmp_path):
    _seed_upstream(tmp_path)
    stages.run_filter(_cfg(tmp_path))
    for stage, run in (("filter", stages.run_filter), ("bucket", stages.run_bucket)):
        with exclusive(tmp_path / ".locks" / f"{stage}.lock", "first run"):  # the lock run_<stage> takes
            with pytest.raises(LockHeld, match=r"data " + stage + r" stage .* in use by pid \d+ on "):
                run(_cfg(tmp_path))
        run(_cfg(tmp_path))  # released: runs again


def test_commit_folder_without_rename_exchange_still_replaces_the_folder_whole(tmp_path, monkeypatch):
    import ultraflux_core.files as files

    monkeypatch.setattr(files, "_exchange", lambda a, b: False)  # a platform without renameat2
    for version in ("old", "new"):
        with files.commit_folder(tmp_path / "out") as out:
            (out / "a.txt").write_text(version)
            (out / "b.txt").write_text(version)
    assert {p.name: p.read_text() for p in (tmp_path / "out").iterdir()} == {"a.txt": "new", "b.txt": "new"}
    with pytest.raises(RuntimeError), files.commit_folder(tmp_path / "out") as out:
        (out / "a.txt").write_text("never")
        raise RuntimeError("killed")
    assert (tmp_path / "out" / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no sibling left behind
