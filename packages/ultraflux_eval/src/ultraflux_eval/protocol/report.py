"""Evaluation report: Markdown + HTML tables, one PNG bar chart per metric across aspect ratios, one image grid
per aspect ratio, and the per-image rows as CSV. Files only (MLflow logging lives in ``protocol/logging.py``)."""

from __future__ import annotations

import csv
import html
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ultraflux_eval.metrics.scores import ImageLike, load_rgb
from ultraflux_eval.protocol.evaluate import OVERALL, EvalResults

GRID_CELL = 256  # longest side of a grid thumbnail


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


def metric_plot(results: EvalResults, metric: str, path: Path) -> Path:
    """Bar chart of one metric across the aspect ratios (``overall`` as a dashed line)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on workers
    import matplotlib.pyplot as plt

    aspects = [a for a in results.aspects if metric in results.table[a]]
    values = [results.table[a][metric] for a in aspects]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.bar(aspects, values, color="#4c72b0")
    if metric in results.table.get(OVERALL, {}):
        ax.axhline(results.table[OVERALL][metric], color="black", linestyle="--", linewidth=1, label=OVERALL)
        ax.legend(loc="best")
    ax.set_title(f"{metric} per aspect ratio")
    ax.set_xlabel("aspect ratio")
    ax.set_ylabel(metric)
    fig.tight_layout()
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
    header, body = _table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def write_report(
    results: EvalResults, images: Sequence[ImageLike], out_dir: Path, columns: int = 4, title: str | None = None
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html``, ``per_image.csv``, ``plots/<metric>.png``, ``grids/<aspect>.png``.

    Returns the written paths by name. Grid file names replace ``:`` (not allowed on every filesystem) by ``x``.
    """
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    (out_dir / "grids").mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for metric in results.metrics:
        written[f"plot:{metric}"] = metric_plot(results, metric, out_dir / "plots" / f"{metric}.png")
    for aspect in results.aspects:
        members = [images[row["index"]] for row in results.rows if row["aspect"] == aspect]
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
    md = [f"# {title}", "", markdown_table(results), "", "## Plots", ""]
    md += [f"![{m}](plots/{m}.png)" for m in results.metrics]
    md += ["", "## Samples", ""]
    md += [f"### {a}\n\n![{a}](grids/{a.replace(':', 'x')}.png)\n" for a in results.aspects]
    (out_dir / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    written["markdown"] = out_dir / "report.md"

    header, body = _table_rows(results)
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    plots = "".join(f'<img src="plots/{html.escape(m)}.png" alt="{html.escape(m)}">' for m in results.metrics)
    grids = "".join(
        f'<h3>{html.escape(a)}</h3><img src="grids/{html.escape(a.replace(":", "x"))}.png" alt="{html.escape(a)}">'
        for a in results.aspects
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px}</style></head>"
        f"<body><h1>{html.escape(title)}</h1><table><tr>{cells}</tr>{trs}</table>"
        f"<h2>Plots</h2>{plots}<h2>Samples</h2>{grids}</body></html>"
    )
    (out_dir / "report.html").write_text(page, encoding="utf-8")
    written["html"] = out_dir / "report.html"
    return written

