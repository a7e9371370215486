"""Load any raygen spec: defaults < YAML file < `--set key.path=value` overrides.

Every problem is collected and raised as one `SpecError` naming the dotted key path,
the bad value and the fix; unknown keys get a did-you-mean.
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from raygen.jobs.errors import SpecError

SpecT = TypeVar("SpecT", bound=BaseModel)


def load_spec(
    spec_cls: type[SpecT],
    path: str | Path,
    overrides: list[str] | None = None,
) -> SpecT:
    """Read a YAML spec file, apply `--set` overrides and validate it.

    Raises:
        SpecError: the file is missing or not YAML, or the spec is invalid.
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(source, "file not found; check the path to the spec.") from None
    except OSError as exc:
        raise SpecError(source, f"cannot read the file: {exc.strerror}.") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(source, f"is not valid YAML{at}: {problem}.") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(source, f"must be a mapping of keys to values, not a {type(raw).__name__}.")
    return validate_spec(spec_cls, raw, source, overrides)


def validate_spec(
    spec_cls: type[SpecT],
    raw: dict[str, Any],
    source: str,
    overrides: list[str] | None = None,
) -> SpecT:
    """Validate a spec given as a dict, after applying `--set` overrides."""
    problems: list[str] = []
    data = copy.deepcopy(raw)
    for item in overrides or []:
        problem = apply_override(spec_cls, data, item)
        if problem:
            problems.append(problem)
    try:
        spec = spec_cls.model_validate(data)
    except ValidationError as exc:
        problems += describe_validation_error(spec_cls, exc)
    if problems:
        raise SpecError(source, problems)
    return spec


def apply_override(spec_cls: type[BaseModel], data: dict[str, Any], item: str) -> str | None:
    """Apply one `key.path=value` override to `data` in place; return a problem or None."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        return f"--set {item!r}: expected key.path=value, e.g. --set train.max_steps=500."
    problem = check_key_path(spec_cls, key.split("."))
    if problem:
        return f"--set {key}: {problem}"
    value = parse_value(text)
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value
    return None


def parse_value(text: str) -> Any:
    """A `--set` value as YAML, reading `5e7`-style numbers (strings in YAML 1.1) as floats."""
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in {"nan", "inf", "-inf"} else value
        except ValueError:
            return value
    return value


def check_key_path(spec_cls: type[BaseModel], parts: list[str]) -> str | None:
    """Return why `parts` is not a key of `spec_cls` (with a did-you-mean), or None."""
    cls: Any = spec_cls
    for depth, part in enumerate(parts):
        model = _model_class(cls)
        if model is None:
            if _is_open_dict(cls):
                return None  # free-form mappings (model.config, deepspeed.overrides)
            parent = ".".join(parts[:depth])
            return f"`{parent}` is a value, not a section; it has no key `{part}`."
        if part not in model.model_fields:
            return f"unknown key `{'.'.join(parts[: depth + 1])}`{_suggest(part, model)}"
        cls = model.model_fields[part].annotation
    return None


def describe_validation_error(spec_cls: type[BaseModel], exc: ValidationError) -> list[str]:
    """Turn pydantic's errors into one readable line each, naming the dotted key path."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        path = ".".join(loc) or "(top level)"
        kind = err["type"]
        msg = err["msg"].removeprefix("Value error, ")
        msg = msg[:1].lower() + msg[1:]
        if kind == "extra_forbidden":
            parent = _model_at(spec_cls, loc[:-1])
            hint = _suggest(loc[-1], parent) if parent else ""
            lines.append(f"`{path}`: unknown key{hint}")
        elif kind == "missing":
            lines.append(f"`{path}`: missing; this key is required.")
        elif kind in {"model_type", "dict_type"}:
            lines.append(f"`{path}`: must be a section (a mapping of keys), got {err['input']!r}.")
        elif kind == "value_error":
            lines.append(f"`{path}`: {msg}." if loc else f"{msg}.")
        else:
            lines.append(f"`{path}`: got {err['input']!r}; {msg}.")
    return lines


def _suggest(name: str, model: type[BaseModel]) -> str:
    names = list(model.model_fields)
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean `{close[0]}`?"
    return f"; valid keys here: {', '.join(names)}."


def _model_at(spec_cls: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    cls: Any = spec_cls
    for part in loc:
        model = _model_class(cls)
        if model is None:
            # A mapping of names to sections (e.g. a sweep's `search`): `part` is a name.
            args = typing.get_args(cls) if typing.get_origin(cls) is dict else ()
            if len(args) == 2 and _model_class(args[1]) is not None:
                cls = args[1]
                continue
            return None
        if part not in model.model_fields:
            return None
        cls = model.model_fields[part].annotation
    return _model_class(cls)


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation like `Section` or `Section | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            model = _model_class(arg)
            if model is not None:
                return model
    return None


def _is_open_dict(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_open_dict(a) for a in typing.get_args(annotation))
    return origin is dict or annotation is dict


def dump_spec(spec: BaseModel) -> str:
    """The spec as YAML, every default filled in (the `spec.yaml` of a run)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
