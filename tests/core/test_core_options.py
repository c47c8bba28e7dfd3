"""CLI options generated from config sections (``ultraflux_core.options``): every scalar field is a flag with the
field's type, choices and description; a flag is one more override, applied after ``--set``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
import typer
from pydantic import Field
from typer.testing import CliRunner
from ultraflux_core.config import Section, load
from ultraflux_core.options import Options, config_options


class Inner(Section):
    depth: int = 1


class Demo(Section):
    name: str = Field("a", description="a name")
    steps: int = Field(50, ge=1)
    mode: Literal["fast", "slow"] = "fast"
    flag: bool = False
    out: Path = Path("out")
    tags: tuple[str, ...] = ()  # not a scalar: reachable through --set only
    inner: Inner = Inner()  # a section: likewise


class Root(Section):
    demo: Demo = Demo()


def _app(seen: list[Root]) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @config_options(Options("demo", Demo, exclude=("out",)))
    def run(steps: int = typer.Option(0, help="the command's own --steps wins"), *, config: list[Path],
            overrides: list[str]) -> None:
        seen.append(load(Root, config, overrides))
        typer.echo(f"own steps {steps}")

    @app.command()
    def other() -> None:  # a second command, so typer keeps `run` as a subcommand
        pass

    return app


def test_flags_are_overrides_after_set_with_the_fields_types() -> None:
    seen: list[Root] = []
    app = _app(seen)
    result = CliRunner().invoke(app, ["run", "--set", "demo.name=b", "--set", "demo.mode=slow", "--name", "c",
                                      "--flag", "--set", "demo.tags=[x,y]", "--set", "demo.inner.depth=3"])
    assert result.exit_code == 0, result.output
    assert seen[-1].demo == Demo(name="c", mode="slow", flag=True, tags=("x", "y"), inner=Inner(depth=3))


@pytest.mark.parametrize("value", ["yes", "1e-3", "null", "[1, 2]", "x: y"])
def test_string_flags_stay_strings(value: str) -> None:
    seen: list[Root] = []
    assert CliRunner().invoke(_app(seen), ["run", "--name", value]).exit_code == 0
    assert seen[-1].demo.name == value


def test_choices_own_parameters_and_exclusions() -> None:
    seen: list[Root] = []
    app = _app(seen)
    bad = CliRunner().invoke(app, ["run", "--mode", "medium"])
    assert bad.exit_code != 0 and "medium" in bad.output and not seen
    own = CliRunner().invoke(app, ["run", "--steps", "7"])  # the command's parameter, not demo.steps
    assert own.exit_code == 0 and "own steps 7" in own.output and seen[-1].demo.steps == 50
    assert CliRunner().invoke(app, ["run", "--out", "x"]).exit_code != 0  # excluded: no such flag
    assert CliRunner().invoke(app, ["run", "--tags", "x"]).exit_code != 0  # not a scalar: no flag
    usage = CliRunner().invoke(app, ["run", "--help"], terminal_width=200).output
    assert "a name" in usage and "demo.name" in usage and "--no-flag" in usage


def test_a_flag_value_is_validated_like_the_file() -> None:
    seen: list[Root] = []
    result = CliRunner().invoke(_app(seen), ["run", "--set", "demo.steps=0"])
    assert result.exit_code != 0 and "demo.steps" in str(result.exception)
