"""The benchmark grid on the local compute engine resumes per cell: a run limited to some cells, or SIGKILLed in
the middle, is finished by a re-run that generates only the missing cells, and the result is byte for byte the
uninterrupted run's; damaged cells (a half-written PNG, a lost sidecar, another cell's PNG) are generated again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ultraflux_core.errors import UltraFluxError
from ultraflux_data.benchmark import run_grid
from ultraflux_model.config import GenerateConfig

from tests.servers import REPO, REPO_PATH

SETTINGS = GenerateConfig(steps=1, dtype="fp32")
PROMPTS = ["a red fox", "a blue boat"]
ASPECTS = [("1:1", 64, 64), ("2:1", 128, 64)]
SEEDS = [3]
CELLS = len(PROMPTS) * len(ASPECTS) * len(SEEDS)

KILLED_RUN = """
import json, sys
from ultraflux_data.benchmark import run_grid
from ultraflux_model.config import GenerateConfig
args = json.loads(sys.argv[1])
run_grid(args["model"], args["prompts"], [tuple(a) for a in args["aspects"]], args["seeds"],
         GenerateConfig.model_validate(args["settings"]), args["out"], progress=False)
"""


def _grid(model: Path, out: Path, **kwargs):
    return run_grid(str(model), PROMPTS, ASPECTS, SEEDS, SETTINGS, out, progress=False, **kwargs)


def _pngs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("seed*/*/*.png"))}


def _sidecars(out: Path) -> int:
    """Sidecars under their final names (a cell being generated has a sidecar in its hidden staging folder)."""
    return len(list(out.glob("seed*/*/*.json")))


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("grid") / "reference"
    run = _grid(tiny_checkpoint, out)
    assert (run.generated, run.reused, run.missing) == (CELLS, 0, 0)
    return out


def test_a_limited_run_is_finished_by_a_rerun_of_only_the_missing_cells(tiny_checkpoint, tmp_path, reference):
    first = _grid(tiny_checkpoint, tmp_path, max_cells=3)
    assert (first.generated, first.reused, first.missing) == (3, 0, CELLS - 3)
    assert len(first.images) == 3
    second = _grid(tiny_checkpoint, tmp_path)
    assert (second.generated, second.reused, second.missing) == (CELLS - 3, 3, 0)
    assert _pngs(tmp_path) == _pngs(reference)
    assert [g.image.path.relative_to(tmp_path) for g in second.images] == [
        p.relative_to(reference) for p in (g.image.path for g in _grid(tiny_checkpoint, reference).images)]
    again = _grid(tiny_checkpoint, tmp_path)  # nothing left: no model is even loaded
    assert (again.generated, again.reused) == (0, CELLS)
    with pytest.raises(UltraFluxError, match="max_cells must be 0 or more"):
        _grid(tiny_checkpoint, tmp_path, max_cells=-1)


@pytest.mark.slow
def test_a_sigkilled_run_resumes_where_it_stopped(tiny_checkpoint, tmp_path, reference):
    out = tmp_path / "out"
    args = {"model": str(tiny_checkpoint), "prompts": PROMPTS, "aspects": ASPECTS, "seeds": SEEDS,
            "settings": SETTINGS.model_dump(mode="json"), "out": str(out)}
    env = {**os.environ, "PYTHONPATH": REPO_PATH}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, json.dumps(args)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while _sidecars(out) < 1:  # a sidecar is written last: a cell is finished
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the grid run wrote no cell within 300 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = _sidecars(out)
    assert 1 <= finished < CELLS, "the run ended before it was killed: the test proves nothing"
    resumed = _grid(tiny_checkpoint, out)
    assert (resumed.generated, resumed.reused, resumed.missing) == (CELLS - finished, finished, 0)
    assert _pngs(out) == _pngs(reference)


def test_damaged_cells_are_generated_again(tiny_checkpoint, tmp_path, reference):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    pngs = sorted(out.glob("seed*/*/*.png"))
    pngs[0].write_bytes(pngs[0].read_bytes()[:100])  # half-written (a copy from an older writer, a full disk)
    pngs[1].with_suffix(".json").unlink()  # killed between the PNG and its sidecar
    shutil.copyfile(pngs[3], pngs[2])  # a whole, valid PNG, but another cell's
    (pngs[3].parent / ".0001_128x64_seed3.x1y2").mkdir()  # a killed run's staging folder: ignored
    rerun = _grid(tiny_checkpoint, out)
    assert (rerun.generated, rerun.reused, rerun.missing) == (3, CELLS - 3, 0)
    assert _pngs(out) == _pngs(reference)
