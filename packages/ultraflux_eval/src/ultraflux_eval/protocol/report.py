"""Evaluation report: Markdown + HTML tables, one PNG bar chart per metric across aspect ratios, one image grid
per aspect ratio with its prompts, and the per-image rows as CSV. Files only (MLflow logging lives in
``protocol/logging.py``).

The report explains itself: a header (what was evaluated, its content hash, when, from which commit, under which
protocol and backbones), a banner when learned scores came from tiny random backbones, and a reference table with
the paper's values (the metric table's ``paper_4096``) and the current champion's beside this run's.
"""

from __future__ import annotations

import csv
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ultraflux_eval.metrics.scores import ImageLike, load_rgb
from ultraflux_eval.metrics.table import METRICS
from ultraflux_eval.protocol.evaluate import OVERALL, EvalResults

GRID_CELL = 256  # longest side of a grid thumbnail
PAPER_COLUMN = "paper (UltraFlux, 4096²)"


@dataclass(frozen=True)
class ReportContext:
    """What the report says about its run besides the numbers.

    ``about``: header rows in order (model, content hash, date, git sha, protocol, backbones, ...);
    ``backbones``: ``eval.backbones.source`` (``tiny`` puts the banner on the page when a learned metric ran);
    ``champion``: ``(label, {"<metric>/overall": value})`` of the current champion's evaluation, or ``None``.
    """

    about: Mapping[str, str] = field(default_factory=dict)
    backbones: str = "tiny"
    champion: tuple[str, Mapping[str, float]] | None = None


def tiny_banner(metrics: Sequence[str], backbones: str) -> str | None:
    """The warning for scores from tiny random backbones (``None`` when every metric is weight-free or real)."""
    learned = [m for m in metrics if m in METRICS and METRICS[m].kind != "weight-free"]
    if backbones != "tiny" or not learned:
        return None
    return (
        f"{', '.join(learned)} were computed with tiny RANDOM backbones (eval.backbones.source=tiny): they check "
        "the pipeline and are NOT comparable with the paper, with real weights or across models. Fetch real weights "
        "(`ultraflux-eval weights fetch`) and set eval.backbones.source=local for meaningful scores."
    )


def reference_rows(
    results: EvalResults, champion: tuple[str, Mapping[str, float]] | None
) -> tuple[list[str], list[list[str]]]:
    """One row per metric: this run's overall value, the paper's UltraFlux value at 4096² (metric table), the
    champion's overall value, and which direction is better."""
    header = ["metric", "this run (overall)", PAPER_COLUMN]
    if champion is not None:
        header.append(f"champion {champion[0]}")
    header.append("better")
    body = []
    for metric in results.metrics:
        info = METRICS.get(metric)
        ours = results.table.get(OVERALL, {}).get(metric)
        row = [metric, _num(ours), _num(info.paper_4096 if info else None)]
        if champion is not None:
            row.append(_num(champion[1].get(f"{metric}/{OVERALL}")))
        row.append("" if info is None else ("higher" if info.higher_is_better else "lower"))
        body.append(row)
    return header, body


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def image_grid(images: Sequence[ImageLike], columns: int, cell: int = GRID_CELL) -> Image.Image:
    """Thumbnails (longest side ``cell``, aspect kept) on a white canvas, ``columns`` per row."""
    thumbs = []
    for image in images:
        thumb = Image.fromarray(load_rgb(image))
        thumb.thumbnail((cell, cell), Image.Resampling.LANCZOS)
        thumbs.append(thumb)
    columns = max(1, min(columns, len(thumbs)))
    rows = (len(thumbs) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * cell, rows * cell), "white")
    for index, thumb in enumerate(thumbs):
        x, y = (index % columns) * cell, (index // columns) * cell
        canvas.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
    return canvas


def metric_figure(results: EvalResults, metric: str):  # -> matplotlib.figure.Figure
    """Bar chart of one metric across the aspect ratios (``overall`` as a dashed line).

    Every bar carries its value, so a metric that is 0 everywhere (``flat_percentage`` of detailed images) still
    reads as "0" and not as an empty panel; the legend sits above the axes, never over a bar."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on workers
    import matplotlib.pyplot as plt

    aspects = [a for a in results.aspects if metric in results.table[a]]
    values = [results.table[a][metric] for a in aspects]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    bars = ax.bar(aspects, values, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], padding=2, fontsize=8)
    top = max([abs(v) for v in values] + [abs(results.table.get(OVERALL, {}).get(metric, 0.0))])
    ax.set_ylim(min(0.0, *values) * 1.15, (top or 1.0) * 1.15)  # head-room for the labels; a flat 0 gets a scale
    if not any(values):
        ax.text(0.5, 0.5, f"{metric} is 0 for every aspect ratio", transform=ax.transAxes, ha="center",
                va="center", color="#555555")  # fmt: skip
    if metric in results.table.get(OVERALL, {}):
        ax.axhline(results.table[OVERALL][metric], color="black", linestyle="--", linewidth=1, label=OVERALL)
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8, borderaxespad=0.1)
    ax.set_title(f"{metric} per aspect ratio", loc="left")
    ax.set_xlabel("aspect ratio")
    ax.set_ylabel(metric)
    fig.tight_layout()
    return fig


def metric_plot(results: EvalResults, metric: str, path: Path) -> Path:
    """:func:`metric_figure` saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = metric_figure(results, metric)
    fig.savefig(path)
    plt.close(fig)
    return path


def _table_rows(results: EvalResults) -> tuple[list[str], list[list[str]]]:
    metrics = ["n_images", *results.metrics]
    header = ["aspect", *metrics]
    body = []
    for aspect in [*results.aspects, OVERALL]:
        row = results.table[aspect]
        body.append([aspect, *(f"{row[m]:.4g}" if m in row else "-" for m in metrics)])
    return header, body


def markdown_table(results: EvalResults) -> str:
    return _md_table(*_table_rows(results))


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _html_table(header: list[str], body: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><tr>{cells}</tr>{trs}</table>"


def write_report(
    results: EvalResults,
    images: Sequence[ImageLike],
    out_dir: Path,
    columns: int = 4,
    title: str | None = None,
    context: ReportContext | None = None,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html``, ``per_image.csv``, ``plots/<metric>.png``, ``grids/<aspect>.png``.

    Returns the written paths by name. Grid file names replace ``:`` (not allowed on every filesystem) by ``x``.
    """
    out_dir = Path(out_dir)
    context = context or ReportContext()
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    (out_dir / "grids").mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for metric in results.metrics:
        written[f"plot:{metric}"] = metric_plot(results, metric, out_dir / "plots" / f"{metric}.png")
    prompts: dict[str, list[str]] = {}  # per aspect, the prompt of each grid cell in order
    for aspect in results.aspects:
        members = [images[row["index"]] for row in results.rows if row["aspect"] == aspect]
        prompts[aspect] = [str(row["prompt"]) for row in results.rows if row["aspect"] == aspect]
        path = out_dir / "grids" / f"{aspect.replace(':', 'x')}.png"
        image_grid(members, columns).save(path)
        written[f"grid:{aspect}"] = path

    columns_csv = sorted({key for row in results.rows for key in row}, key=lambda k: (k != "index", k))
    with open(out_dir / "per_image.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns_csv)
        writer.writeheader()
        writer.writerows(results.rows)
    written["csv"] = out_dir / "per_image.csv"

    title = title or f"Evaluation: {results.benchmark}"
    banner = tiny_banner(results.metrics, context.backbones)
    ref_header, ref_body = reference_rows(results, context.champion)
    md = [f"# {title}", ""]
    md += [f"- **{k}**: {v}" for k, v in context.about.items()]
    md += ["", f"> **Warning:** {banner}", ""] if banner else [""]
    md += [markdown_table(results), "", "## Reference", "", _md_table(ref_header, ref_body), "", "## Plots", ""]
    md += [f"![{m}](plots/{m}.png)" for m in results.metrics]
    md += ["", "## Samples", ""]
    for a in results.aspects:
        md += [f"### {a}\n\n![{a}](grids/{a.replace(':', 'x')}.png)\n"]
        md += [f"{k + 1}. {p}" for k, p in enumerate(prompts[a])] + [""]
    (out_dir / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    written["markdown"] = out_dir / "report.md"

    plots = "".join(f'<img src="plots/{html.escape(m)}.png" alt="{html.escape(m)}">' for m in results.metrics)
    grids = "".join(
        f'<h3>{html.escape(a)}</h3><img src="grids/{html.escape(a.replace(":", "x"))}.png" alt="{html.escape(a)}">'
        f"<p>Prompts, left to right and top to bottom:</p><ol class='prompts'>"
        + "".join(f"<li>{html.escape(p)}</li>" for p in prompts[a])
        + "</ol>"
        for a in results.aspects
    )
    about = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in context.about.items())
    warning = f"<p class='banner' role='alert'><b>Warning:</b> {html.escape(banner)}</p>" if banner else ""
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px}"
        ".about th{text-align:left}.banner{background:#fff3cd;border:1px solid #d39e00;padding:8px}</style></head>"
        f"<body><h1>{html.escape(title)}</h1><table class='about'>{about}</table>{warning}"
        f"<h2>Scores</h2>{_html_table(*_table_rows(results))}"
        f"<h2>Reference</h2>{_html_table(ref_header, ref_body)}"
        f"<h2>Plots</h2>{plots}<h2>Samples</h2>{grids}</body></html>"
    )
    (out_dir / "report.html").write_text(page, encoding="utf-8")
    written["html"] = out_dir / "report.html"
    return written

