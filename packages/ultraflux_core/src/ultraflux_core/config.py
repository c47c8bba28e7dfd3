"""The config machinery every package shares: frozen sections that reject unknown keys, and the one loader that
layers YAML files and ``section.key=value`` overrides.

Each package owns its sections (``ultraflux_model.config``, ``ultraflux_data.config``, ``ultraflux_eval.config``,
``ultraflux_core.tracking.config``); the root tree that ``params.yaml`` serialises is assembled above them
(``ultraflux.config``). This module knows none of them: it works on any :class:`Section` subclass.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ultraflux_core.errors import UltraFluxError

S = TypeVar("S", bound=BaseModel)


class Section(BaseModel):
    """Base of every config section: immutable, unknown keys rejected (a typo fails loudly)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` laid over ``base``; mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) \
            else value
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"generate.steps=10"`` → (["generate", "steps"], 10); the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in item:
        raise UltraFluxError(f"override {item!r} must look like section.key=value")
    dotted, raw = item.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise UltraFluxError(f"override {item!r} has an empty key; write section.key=value")
    return keys, yaml.safe_load(raw) if raw else ""


def _list_position(items: list[Any], key: str, where: str) -> int:
    """Index of a list item named by position (``0``) or by its ``name`` field (``stage2``)."""
    names = [item.get("name") if isinstance(item, dict) else None for item in items]
    if key.lstrip("-").isdigit():
        index = int(key)
        if not -len(items) <= index < len(items):
            raise UltraFluxError(f"{where} has {len(items)} item(s) {names}; there is no item {index}")
        return index % len(items)
    if key in names:
        return names.index(key)
    raise UltraFluxError(f"{where} has no item named {key!r}; items: {names} (or use a position 0..{len(items) - 1})")


def apply_override(tree: dict[str, Any], keys: list[str], value: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``tree`` with the value at ``keys`` set; list items (e.g. ``train.stages``) are addressed by
    position or ``name``. Sections the files did not set are taken from ``defaults`` first, so overriding one
    field of a default stage keeps the others."""
    out = copy.deepcopy(tree)
    node: Any = out
    default: Any = defaults
    for depth, key in enumerate(keys):
        where = ".".join(keys[:depth]) or "config"
        last = depth == len(keys) - 1
        if isinstance(node, list):
            index = _list_position(node, key, where)
            if last:
                node[index] = value
                break
            default = None
            node = node[index]
            continue
        if not isinstance(node, dict):
            raise UltraFluxError(f"{where} is a value, not a section: cannot set {'.'.join(keys)}")
        if last:
            node[key] = value
            break
        child_default = default.get(key) if isinstance(default, dict) else None
        if key not in node or not isinstance(node[key], (dict, list)):
            node[key] = copy.deepcopy(child_default) if isinstance(child_default, (dict, list)) else {}
        node, default = node[key], child_default
    return out


def read_yaml(path: Path | str) -> dict[str, Any]:
    """A YAML file holding a mapping (the one reader of config files)."""
    path = Path(path)
    if not path.is_file():
        raise UltraFluxError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UltraFluxError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise UltraFluxError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _fields_at(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """The field names of the section that holds the last key of ``loc`` (a pydantic error location), following
    nested sections, tuples/lists of sections (integer steps) and ``X | None``; [] when it is not a section."""
    node: Any = model
    for step in loc:
        if isinstance(step, int):
            continue
        fields = getattr(node, "model_fields", None)
        if fields is None or step not in fields:
            return []
        node = _section_type(fields[step].annotation)
    return list(getattr(node, "model_fields", {}))


def _section_type(annotation: Any) -> Any:
    """The section class inside ``annotation`` (``S``, ``S | None``, ``tuple[S, ...]``, ``list[S]``), else it."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _section_type(arg)
        if isinstance(found, type) and issubclass(found, BaseModel):
            return found
    return annotation


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _human(error: Mapping[str, Any], model: type[BaseModel] | None) -> str:
    """pydantic's message in the words of a config file: unknown keys with the closest known ones, validators'
    own messages without pydantic's "Value error, " prefix, other refusals with the value that was given."""
    kind, msg = error["type"], str(error["msg"])
    if kind == "extra_forbidden":
        name = str(error["loc"][-1])
        known = _fields_at(model, error["loc"][:-1]) if model is not None else []
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else (
            f" (known: {', '.join(known)})" if known else "")
        return f"unknown setting {name!r}{hint}"
    if kind == "missing":
        return "required setting is missing"
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if kind in ("value_error", "assertion_error"):
        return msg
    msg = msg.replace("Input should be", "should be", 1)
    value = error.get("input")
    return f"{msg}, got {_shown(value)}" if isinstance(value, (str, int, float, bool)) or value is None else msg


def _error_line(error: Mapping[str, Any], prefix: str, removed: Mapping[str, str],
                model: type[BaseModel] | None = None) -> str:
    """One validation error as ``  dotted.path: message`` (:func:`_human`), with the migration hint for a removed
    key."""
    where = prefix + ".".join(str(p) for p in error["loc"])
    pattern = prefix + ".".join("*" if isinstance(p, int) else str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden" and pattern in removed:
        return f"  {where}: unknown setting {str(error['loc'][-1])!r} (removed in this version: {removed[pattern]})"
    return f"  {where}: {_human(error, model)}"


def validate(model: type[S], data: Mapping[str, Any], source: str = "config", *, prefix: str = "",
             removed: Mapping[str, str] | None = None) -> S:
    """Validate a plain mapping as ``model``; the error lists every offending field path (``prefix`` names where
    the mapping sits in the root tree, e.g. ``eval.``; ``removed`` maps a dotted key, list indices written ``*``,
    to where the setting went)."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = [_error_line(e, prefix, removed or {}, model) for e in err.errors()]
        raise UltraFluxError(f"invalid {source}:\n" + "\n".join(lines)) from err


def layered(
    paths: Sequence[Path | str] = (), overrides: Sequence[str] = (), *, defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """YAML files merged in order (later wins) and ``key=value`` overrides applied, as a plain mapping.

    ``defaults`` (the model's defaults dumped to JSON) fill the sections an override reaches into that the files
    did not set, so one field of a default list item can be changed alone.
    """
    merged: dict[str, Any] = {}
    for path in paths:
        merged = deep_merge(merged, read_yaml(path))
    for item in overrides:
        merged = apply_override(merged, *parse_override(item), dict(defaults or {}))
    return merged


def load(model: type[S], paths: Sequence[Path | str] = (), overrides: Sequence[str] = (), *,
         removed: Mapping[str, str] | None = None) -> S:
    """The one config loader: ``model`` validated from layered YAML files and overrides (nothing → defaults)."""
    defaults = model().model_dump(mode="json") if overrides else None
    data = layered(paths, overrides, defaults=defaults)
    return validate(model, data, " + ".join(str(p) for p in paths) or "config", removed=removed)


def dump_config(config: BaseModel) -> str:
    """YAML text of a config tree (the format of ``params.yaml``)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
