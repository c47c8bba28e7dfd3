"""The report explains itself: header, tiny-backbone banner, prompts with the grids, the paper's and the champion's
columns, and charts without empty panels or legends over the bars (read back from report.html and the figures)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image
from ultraflux_eval.config import BenchmarkConfig, EvalConfig
from ultraflux_eval.metrics.table import METRICS
from ultraflux_eval.protocol.evaluate import OVERALL, EvalResults
from ultraflux_eval.protocol.report import PAPER_COLUMN, ReportContext, metric_figure, tiny_banner, write_report
from ultraflux_eval.protocol.session import run_evaluation


class Tables(HTMLParser):
    """The page's tables as lists of rows of cell texts, plus every text run."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.texts: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        self.texts.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _images(tmp_path, model_hash="ab" * 32):
    """Four PNGs with generator sidecars (two prompts x two aspect ratios)."""
    rng = np.random.default_rng(0)
    paths, prompts = [], []
    for k, (w, h, prompt) in enumerate([(128, 128, "a fox"), (128, 128, "a lighthouse"), (256, 128, "a fox"),
                                        (256, 128, "a lighthouse")]):  # fmt: skip
        path = tmp_path / f"{k:04d}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        path.with_suffix(".json").write_text(json.dumps({"prompt": prompt, "model": "/srv/r/ultraflux-ab",
                                                         "model_hash": model_hash}))  # fmt: skip
        paths.append(path)
        prompts.append(prompt)
    return paths, prompts


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    paths, prompts = _images(tmp)
    config = EvalConfig(benchmark=BenchmarkConfig(
        metrics=("glcm", "flat_percentage", "clip_score"), prompts=("a fox", "a lighthouse"),
        aspect_ratios=[{"name": "1:1", "width": 128, "height": 128}, {"name": "2:1", "width": 256, "height": 128}],
    ))  # fmt: skip
    champion = ("v3", {"clip_score/overall": 31.5, "glcm/overall": 7.25})
    run_evaluation(paths, prompts, config, tmp / "out", log=False, champion=champion,
                   about={"git sha": "0123abc"})  # fmt: skip
    parser = Tables()
    parser.feed((tmp / "out" / "report.html").read_text())
    return parser, tmp / "out"


def test_header_names_model_hash_date_sha_protocol_and_backbones(page):
    parser, _ = page
    about = dict(parser.tables[0])
    assert about["model"] == "/srv/r/ultraflux-ab" and about["content hash (sha256)"] == "ab" * 32
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", about["date (UTC)"])
    assert about["git sha"] == "0123abc" and about["backbones"] == "tiny"
    assert about["protocol"].startswith("aesthetic-eval")
    assert "comparable with the paper: no: tiny backbones" in about["protocol"]


def test_tiny_backbones_put_a_banner_on_the_page(page):
    parser, _ = page
    text = " ".join(parser.texts)
    assert "clip_score were computed with tiny RANDOM backbones" in text and "NOT comparable with the paper" in text
    assert tiny_banner(["glcm", "flat_percentage"], "tiny") is None  # weight-free only: nothing to warn about
    assert tiny_banner(["clip_score"], "local") is None


def test_reference_columns_hold_the_papers_and_the_champions_values(page):
    parser, _ = page
    header, *rows = parser.tables[2]
    assert header == ["metric", "this run (overall)", PAPER_COLUMN, "champion v3", "better"]
    by_metric = {row[0]: row for row in rows}
    assert by_metric["clip_score"][2:] == [f"{METRICS['clip_score'].paper_4096:.4g}", "31.5", "higher"] == [
        "34.62", "31.5", "higher"]
    assert by_metric["glcm"][2:4] == ["-", "7.25"]  # not in the paper's table
    assert by_metric["flat_percentage"][3:] == ["-", "lower"]  # the champion never logged it


def test_grids_carry_their_prompts_in_cell_order(page):
    _, out = page
    html = (out / "report.html").read_text()
    for aspect in ("1:1", "2:1"):
        section = html.split(f"<h3>{aspect}</h3>")[1].split("</ol>")[0]
        assert re.findall(r"<li>(.*?)</li>", section) == ["a fox", "a lighthouse"]
    assert "1. a fox\n2. a lighthouse" in (out / "report.md").read_text()


def _results(values):
    aspects = list(values)
    table = {a: {"n_images": 1.0, "m": v} for a, v in values.items()}
    table[OVERALL] = {"n_images": float(len(values)), "m": float(np.mean(list(values.values())))}
    return EvalResults("b", aspects, ["m"], [], table)


FULL = {"1:1": 9.0, "16:9": 9.0, "2:1": 9.0, "1:2": 9.0, "2.39:1": 9.0}  # bars across the whole panel


@pytest.mark.parametrize("values", [{"1:1": 0.0, "2:1": 0.0}, {"1:1": 5.0, "2:1": 9.0, "16:9": 9.0}, FULL])
def test_charts_have_no_empty_panel_and_no_legend_over_a_bar(values):
    fig = metric_figure(_results(values), "m")
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t.get_text() for t in ax.texts]
    assert all(f"{v:.3g}" in labels for v in values.values())  # every bar says its value, 0 included
    if not any(values.values()):
        assert any("is 0 for every aspect ratio" in t for t in labels) and ax.get_ylim()[1] > 0
    legend = ax.get_legend().get_window_extent(renderer)
    for bar in ax.patches:
        assert not legend.overlaps(bar.get_window_extent(renderer))
    for text in ax.texts:
        assert not legend.overlaps(text.get_window_extent(renderer))


def test_report_without_context_still_writes(tmp_path):
    paths, _ = _images(tmp_path)
    results = _results({"1:1": 1.0})
    results.rows = [{"index": 0, "aspect": "1:1", "prompt": "a fox"}]
    written = write_report(results, paths[:1], tmp_path / "out", context=ReportContext())
    assert written["html"].is_file()
