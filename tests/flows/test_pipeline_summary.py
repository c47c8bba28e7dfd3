"""The demo's words (issue 20, item 1): one progress line per step and a closing summary that says where the
release, the champion, the report and the VAE table are and what to run next. Pure functions over what the flows
return; the end-to-end run that prints them is tests/flows/test_pipeline.py."""

from __future__ import annotations

import pytest
from ultraflux_core.console import progress_line

from flows.pipeline import STEPS, closing_summary, overall_scores, step_summary

RELEASE = {
    "checkpoint": "/repo/artifacts/release/ultraflux-0123456789ab", "run_id": "abc123",
    "tracking_uri": "sqlite:////repo/artifacts/mlflow.db", "report": "artifacts/release/eval/report/report.html",
    "table": {"1:1": {"clip_score": 30.0, "glcm": 4.0, "n_images": 2},
              "overall": {"clip_score": 31.25, "glcm": 4.5, "n_images": 6}},
    "registry": {"version": "3", "promoted": True, "reason": "first version", "candidate": 31.25, "champion": None},
}
VAE = {"before": {"rfid": 9.0, "psnr": 20.0, "ssim": 0.5, "lpips": 0.4},
       "after": {"rfid": 8.0, "psnr": 21.5, "ssim": 0.6, "lpips": 0.35},
       "export": "artifacts/vae-post/vae",
       "table": "| metric | starting VAE | after training |\n|---|---|---|\n| PSNR (dB) | 20.0000 | 21.5000 |\n"}
TRAIN = [{"stage": "stage1", "steps": 40, "first_loss": 0.81234, "last_loss": 0.45},
         {"stage": "stage2", "steps": 10, "first_loss": 0.5, "last_loss": 0.4}]
DATA = {"ingest": {"total": 35, "ok": 31, "quarantined": 4}, "filter": {"passed": {"passed": 27}},
        "cache": {"entries": 21}}


def test_progress_line_shows_the_share_done_and_the_step():
    line = progress_line(2, 4, "train", "stage1: 40 steps")
    assert line == "[2/4] ██████████·········· train     stage1: 40 steps"
    assert progress_line(4, 4, "release", "x").count("█") == 20 and "\n" not in line
    with pytest.raises(ValueError):
        progress_line(5, 4, "x", "y")


def test_each_step_says_what_it_did_in_one_line():
    lines = [step_summary(step, result) for step, result in zip(STEPS, (DATA, TRAIN, VAE, RELEASE), strict=True)]
    assert lines[0] == "31 of 35 images kept (4 quarantined), 27 passed the filters, 21 cached as latents"
    assert lines[1] == "stage1: 40 steps, loss 0.812 → 0.450; stage2: 10 steps, loss 0.500 → 0.400"
    assert lines[2] == "psnr 20.000 → 21.500, lpips 0.400 → 0.350 (held out)"
    assert lines[3] == "ultraflux-0123456789ab, registered as version 3: now the champion"
    assert step_summary("train", []) == "every stage was already trained (resumed)"
    assert all("\n" not in line for line in lines)


def test_closing_summary_names_everything_a_newcomer_looks_for():
    text = closing_summary({"release": RELEASE, "vae": VAE}, "champion: models:/ultraflux/3 (this release) — x")
    assert "release   /repo/artifacts/release/ultraflux-0123456789ab" in text
    assert "champion: models:/ultraflux/3" in text
    assert "report    artifacts/release/eval/report/report.html" in text
    assert "| PSNR (dB) | 20.0000 | 21.5000 |" in text  # the VAE before/after table the README promises
    assert "make ui" in text
    assert ".venv/bin/mlflow ui --backend-store-uri sqlite:////repo/artifacts/mlflow.db" in text


def test_the_champions_scores_are_the_overall_row():
    assert overall_scores(RELEASE["table"]) == "clip_score 31.25, glcm 4.5"
