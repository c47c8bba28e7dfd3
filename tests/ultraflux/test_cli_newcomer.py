"""The command line as a new user meets it (issue 20, item 4): help without Python types or RST quotes, --version,
the web app's validation, suggested sizes inside the pixel limit, the demo's tracking store as the default of
every lookup and a failed lookup that writes nothing, human error messages."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner
from ultraflux.cli import app
from ultraflux_eval.cli import app as eval_app
from ultraflux_model.config import MAX_4K_BUCKET_PIXELS, GenerateConfig, nearest_valid_size
from ultraflux_model.dtypes import resolve_dtype

runner = CliRunner()


def _commands(command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


APPS = {"ultraflux": app, "ultraflux-eval": eval_app}


@pytest.mark.parametrize("name", list(APPS))
def test_every_option_names_its_value_in_words(name):
    """Options that take text or lists show a placeholder (TEXT, FILE, KEY=VALUE, a|b), never a Python type such as
    <list[Path]> or <str>; no help text carries RST quotes."""
    for path, _ in _commands(typer.main.get_command(APPS[name])):
        text = runner.invoke(APPS[name], [*path, "--help"], env={"COLUMNS": "200"}).output
        where = f"{name} {' '.join(path)}"
        assert "``" not in text, where
        for row in (line for line in text.splitlines() if re.match(r"^│\s+(-\w,\s+)?--", line)):
            assert not re.search(r"<(list\[|str>|Path>)", row), f"{where}: {row.strip()}"


def test_generate_help_names_registry_uris_and_no_python_types():
    text = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "200"}).output
    assert "models:/NAME@ALIAS" in text and "models:/ultraflux@champion" in text and "--overwrite" in text
    assert not re.search(r"<(list\[|str>|int>|float>|Path>|path>)", text)
    assert "FILE" in text and "KEY=VALUE" in text and "auto|bf16|fp16|fp32" in text


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"ultraflux {version('ultraflux')}"


@pytest.mark.parametrize("args,message", [
    (["-p", ""], "the prompt is empty"),
    (["-p", "a fox", "-p", "  "], "prompt 2 of 2 is empty"),
    (["-p", "x", "--width", "99999", "--height", "99999"], "the nearest valid size is 4096x4096"),
    (["-p", "x", "--width", "8192", "--height", "8192"], "over the limit of 16.9 MP per image (serve.max_pixels); "
                                                         "choose a smaller size, e.g. 4096x4096"),
    (["-p", "x", "--width", "64", "--height", "64", "--steps", "0"], "generate.steps: should be greater than or "
                                                                      "equal to 1, got 0"),
    (["-p", "x", "--set", "generate.stepz=3"], "generate.stepz: unknown setting 'stepz' (did you mean 'steps'?)"),
])  # fmt: skip
def test_generate_refuses_what_the_web_app_refuses(tmp_path, args, message):
    result = runner.invoke(app, ["generate", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"),
                                 *args])  # fmt: skip
    assert result.exit_code != 0
    text = str(result.exception)
    assert message in text and "Value error" not in text and "Input should" not in text
    assert not (tmp_path / "o").exists()


def test_suggested_sizes_stay_inside_the_pixel_limit():
    for width, height in [(99999, 99999), (99999, 100), (100, 99999), (20000, 3000), (4100, 4100)]:
        w, h = nearest_valid_size(width, height, MAX_4K_BUCKET_PIXELS)
        assert w % 32 == 0 and h % 32 == 0 and w * h <= MAX_4K_BUCKET_PIXELS, (width, height, w, h)
        assert abs(w / h - width / height) / (width / height) < 0.35  # the same shape, about
    assert nearest_valid_size(1020, 1000, MAX_4K_BUCKET_PIXELS) == (1024, 992)  # small sizes: just rounded


def test_dtype_is_fp32_on_cpu_unless_asked():
    assert GenerateConfig().dtype == "auto"
    assert resolve_dtype("auto", "cpu") == "fp32" and resolve_dtype("auto", "cuda") == "bf16"
    assert resolve_dtype("bf16", "cpu") == "bf16"


@pytest.mark.parametrize("argv,cli", [
    (["generate", "--model", "models:/ultraflux@champion", "-p", "x", "--width", "64", "--height", "64"], app),
    (["compare", "run-a", "run-b"], eval_app),
], ids=["generate", "ultraflux-eval compare"])  # fmt: skip
def test_a_lookup_without_a_store_names_the_demo_store_and_writes_nothing(tmp_path, monkeypatch, argv, cli):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("ULTRAFLUX_MODEL_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(cli, argv)
    assert result.exit_code != 0
    assert f"no MLflow store at {Path('artifacts/mlflow.db').resolve()}: run `make demo` first" in str(result.exception)
    assert [p.name for p in tmp_path.iterdir()] == []  # no stray ./mlflow.db, mlruns/ or artifacts/


def test_loading_the_model_stack_prints_nothing_with_the_demos_settings():
    """The demo's first lines are ours: importing the generation stack (diffusers, which imports torchao) under the
    demo's environment (Makefile: DIFFUSERS_VERBOSITY=error ...) writes nothing to the terminal."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-c", "import ultraflux_model.inference.pipeline"], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == done.stdout == ""
