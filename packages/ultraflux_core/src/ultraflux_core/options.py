"""Command-line options generated from config sections: the CLI reads the config instead of re-declaring it.

:func:`config_options` turns every scalar field of the named sections into a typer option (``--vae-decode``
for ``generate.vae_decode``) whose type, choices and help come from the pydantic field, and adds the two options
every command shares: ``--config/-c`` (YAML files layered in order) and ``--set`` (``section.key=value``). A
given flag becomes one more override, applied after ``--set``; the decorated command receives the files and the
overrides and resolves them with the one loader, so flags, YAML files, ``params.yaml`` and Prefect parameters
are the same fields, validated the same way.

Fields that are not scalars (lists, nested sections) stay reachable through ``--set``; a command that wants a
friendlier spelling for one (``--width/--height`` for ``generate.sizes``) declares that parameter itself, and a
parameter of the command's own always wins over a generated one of the same name.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import typer
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

F = TypeVar("F", bound=Callable[..., Any])
_SCALARS = (str, int, float, bool, Path)


@dataclass(frozen=True)
class Options:
    """The fields of one section to expose: ``prefix`` is the section's place in the root tree (``generate``,
    ``data``); ``include`` limits them to some names, ``exclude`` drops some."""

    prefix: str
    section: type[BaseModel]
    include: Collection[str] | None = None
    exclude: Collection[str] = ()


def _scalar(annotation: Any) -> Any | None:
    """The option type of a field annotation (``X | None`` unwrapped), or None when it is not a scalar."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return _scalar(args[0]) if len(args) == 1 else None
    if get_origin(annotation) is Literal:
        return annotation if all(isinstance(v, (str, int)) for v in get_args(annotation)) else None
    return annotation if annotation in _SCALARS else None


# What help shows for a value instead of typer's Python type names (<str>, <list[Path]>).
METAVARS = {str: "TEXT", int: "INTEGER", float: "NUMBER", Path: "PATH"}
CONFIG_METAVAR, SET_METAVAR = "FILE", "KEY=VALUE"


def metavar(kind: Any) -> str | None:
    """The help placeholder of an option type: ``TEXT``, ``INTEGER``, ``NUMBER``, ``PATH``, ``a|b`` for choices;
    None for a flag."""
    if get_origin(kind) is Literal:
        return "|".join(str(v) for v in get_args(kind))
    return METAVARS.get(kind)


def _help(dotted: str, field: FieldInfo) -> str:
    text = (field.description or "").replace("``", "")
    default = field.get_default(call_default_factory=True)
    shown = "unset" if default is None else default
    return f"{text} ({dotted}, default {shown})".strip()  # not [...]: rich help reads brackets as markup


def override_value(value: Any) -> str:
    """A flag's value as the YAML text of an override (``--set`` syntax), quoted so that strings stay strings."""
    if isinstance(value, Path):
        value = str(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def _generated(groups: Sequence[Options], taken: Collection[str]) -> dict[str, tuple[str, inspect.Parameter]]:
    """Parameter name → (dotted config key, typer parameter) for every exposed scalar field."""
    out: dict[str, tuple[str, inspect.Parameter]] = {}
    for group in groups:
        for name, field in group.section.model_fields.items():
            kind = _scalar(field.annotation)
            wanted = group.include is None or name in group.include
            if kind is None or not wanted or name in group.exclude or name in taken or name in out:
                continue
            dotted = f"{group.prefix}.{name}"
            flag = f"--{name.replace('_', '-')}"
            option = typer.Option(f"{flag}/--no-{flag[2:]}" if kind is bool else flag, help=_help(dotted, field),
                                  metavar=metavar(kind))
            annotation = Annotated[Union[kind, None], option]  # noqa: UP007 - a runtime type for typer
            out[name] = (dotted, inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                                   annotation=annotation))
    return out


def config_options(*groups: Options) -> Callable[[F], F]:
    """Decorate a typer command ``fn(..., config: list[Path], overrides: list[str])``: the wrapper takes
    ``--config/-c``, ``--set`` and one option per exposed field, and calls ``fn`` with the files and every override
    (``--set`` first, then the flags given)."""

    def decorate(fn: F) -> F:
        own = [p for p in inspect.signature(fn).parameters.values() if p.name not in ("config", "overrides")]
        generated = _generated(groups, {p.name for p in own})
        shared = [
            inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=[], annotation=Annotated[
                list[Path], typer.Option("--config", "-c", metavar=CONFIG_METAVAR,
                                         help="YAML file, repeatable: layered in order (e.g. params.yaml)")]),
            inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=[], annotation=Annotated[
                list[str], typer.Option("--set", metavar=SET_METAVAR,
                                        help="section.key=value override, repeatable (any field of the config tree)")]),
        ]
        positional = [p for p in own if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        keyword = [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            config, overrides = kwargs.pop("config"), list(kwargs.pop("set_"))
            for name, (dotted, _) in generated.items():
                value = kwargs.pop(name)
                if value is not None:
                    overrides.append(f"{dotted}={override_value(value)}")
            return fn(*args, config=list(config), overrides=overrides, **kwargs)

        params = positional + keyword + shared + [param for _, param in generated.values()]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        return command  # type: ignore[return-value]

    return decorate
