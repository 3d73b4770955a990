"""Typed, strict conversion of YAML data into frozen dataclasses, and the JSON
Schema of the same dataclasses: one source of truth for validation and docs.

Supported field types: int, float, bool, str, None, Optional/Union, Literal,
list[T], tuple[T, ...], dict[str, T] and nested dataclasses. Field metadata
`help` becomes the schema description.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from optcc.errors import RecipeError


_EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class Located:
    """A YAML value with the line it came from (1-based), for error messages."""

    __slots__ = ("value", "line")

    def __init__(self, value: Any, line: int) -> None:
        self.value = value
        self.line = line


def parse_yaml(text: str, filename: str) -> Located:
    """Parse YAML into nested Located values (dicts keyed by plain str)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark else filename
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{where}: not valid YAML: {problem}", "fix the YAML syntax at that line") from e
    if node is None:
        raise RecipeError(f"{filename}: the recipe is empty", "start from recipes/quickstart.yaml")
    return _from_node(node, filename)


def _from_node(node: yaml.Node, filename: str) -> Located:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Located] = {}
        for k, v in node.value:
            key = yaml.safe_load(yaml.serialize(k)) if not isinstance(k, yaml.ScalarNode) else k.value
            key = str(key)
            if key in out:
                raise RecipeError(f"{filename}:{k.start_mark.line + 1}: duplicate key '{key}'", "keep one")
            out[key] = _from_node(v, filename)
        return Located(out, line)
    if isinstance(node, yaml.SequenceNode):
        return Located([_from_node(v, filename) for v in node.value], line)
    # Resolve the scalar with the safe loader's implicit typing (int, float, bool, null).
    value = yaml.safe_load(yaml.serialize(node))
    return Located(value, line)


def plain(loc: Any) -> Any:
    """Strip Located wrappers."""
    if isinstance(loc, Located):
        return plain(loc.value)
    if isinstance(loc, dict):
        return {k: plain(v) for k, v in loc.items()}
    if isinstance(loc, list):
        return [plain(v) for v in loc]
    return loc


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else ""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


class _Ctx:
    def __init__(self, filename: str) -> None:
        self.filename = filename

    def fail(self, path: str, line: int, msg: str, hint: str) -> RecipeError:
        return RecipeError(f"{self.filename}:{line}: {path}: {msg}", hint)


def convert(loc: Located, tp: Any, path: str, filename: str) -> Any:
    """Convert a Located YAML value to `tp`, raising RecipeError with path and line."""
    return _convert(loc, tp, path, _Ctx(filename))


def _convert(loc: Located, tp: Any, path: str, ctx: _Ctx) -> Any:
    value, line = loc.value, loc.line
    origin = get_origin(tp)
    if tp is Any:
        return plain(loc)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ctx.fail(path, line, f"expected a mapping, got {_describe(value)}", f"write {path} as key: value pairs")
        return build_dataclass(tp, value, path, line, ctx)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(loc, arg, path, ctx)
            except RecipeError as e:
                errors.append(e)
        others = [a for a in args if a is not type(None)]
        if len(others) == 1 and dataclasses.is_dataclass(others[0]) and isinstance(value, dict):
            raise errors[0]  # an optional nested config: its own message names the bad key
        raise ctx.fail(path, line, f"expected {_type_name(tp)}, got {_describe(value)}", "see `optcc passes` or docs/recipe.md for the allowed forms")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            hint = did_you_mean(str(value), [str(a) for a in allowed]) or f"use one of {', '.join(map(str, allowed))}"
            raise ctx.fail(path, line, f"'{value}' is not one of {', '.join(map(str, allowed))}", hint)
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ctx.fail(path, line, f"expected a list, got {_describe(value)}", f"write {path} as [a, b, ...]")
        item_tp = get_args(tp)[0]
        items = [_convert(v, item_tp, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ctx.fail(path, line, f"expected a mapping, got {_describe(value)}", f"write {path} as key: value pairs")
        val_tp = get_args(tp)[1]
        return {k: _convert(v, val_tp, f"{path}.{k}", ctx) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT.match(value):  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is type(None):
        if value is None:
            return None
    else:
        raise TypeError(f"unsupported schema type {tp!r} at {path}")
    raise ctx.fail(path, line, f"expected {_type_name(tp)}, got {_describe(value)}", f"give {path} {_type_name(tp)}")


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"


def build_dataclass(cls: type, raw: dict[str, Located], path: str, line: int, ctx: _Ctx) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, loc in raw.items():
        if key not in fields:
            sub = f"{path}.{key}" if path else key
            hint = did_you_mean(key, fields) or f"allowed keys: {', '.join(fields)}"
            raise ctx.fail(sub, loc.line, "unknown key", hint)
        sub = f"{path}.{key}" if path else key
        kwargs[key] = _convert(loc, hints[key], sub, ctx)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ctx.fail(path or "recipe", line, f"missing required key '{missing[0]}'", f"add {missing[0]}: ...")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        # __post_init__ checks raise ValueError("field: message"); keep the line.
        raise ctx.fail(path or "recipe", line, str(e), "see docs/recipe.md for the allowed values") from e


def to_dict(obj: Any) -> Any:
    """Dataclass (or nested values) to plain JSON-able data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def json_schema(tp: Any) -> dict:
    """JSON Schema (draft 2020-12 subset) of a schema type."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        props, required = {}, []
        for f in dataclasses.fields(tp):
            if not f.init:
                continue
            sub = json_schema(hints[f.name])
            if f.metadata.get("help"):
                sub["description"] = f.metadata["help"]
            if f.default is not dataclasses.MISSING:
                sub["default"] = to_dict(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                sub["default"] = to_dict(f.default_factory())
            else:
                required.append(f.name)
            props[f.name] = sub
        out = {"type": "object", "properties": props, "additionalProperties": False}
        if required:
            out["required"] = required
        if tp.__doc__ and not tp.__doc__.startswith(tp.__name__ + "("):
            out["description"] = " ".join(tp.__doc__.split())
        return out
    if origin in (Union, types.UnionType):
        return {"anyOf": [json_schema(a) for a in get_args(tp)]}
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin in (list, tuple):
        return {"type": "array", "items": json_schema(get_args(tp)[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": json_schema(get_args(tp)[1])}
    simple = {int: "integer", float: "number", bool: "boolean", str: "string", type(None): "null"}
    if tp in simple:
        return {"type": simple[tp]}
    if tp is Any:
        return {}
    raise TypeError(f"unsupported schema type {tp!r}")


def field(default: Any = dataclasses.MISSING, *, help: str = "", default_factory: Any = dataclasses.MISSING) -> Any:
    """dataclasses.field with a `help` text that lands in the JSON Schema and `optcc passes`."""
    kw: dict[str, Any] = {"metadata": {"help": help}}
    if default_factory is not dataclasses.MISSING:
        kw["default_factory"] = default_factory
    else:
        kw["default"] = default
    return dataclasses.field(**kw)
