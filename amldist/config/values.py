"""Plain dicts <-> typed config: key checking, YAML scalars and type checks against the fields.

Every error is a UserError naming the dotted key (`optim.lr: expected a float, got 'fast'`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

import yaml

from amldist.config.schema import SECTIONS, TOP_LEVEL_FIELDS, Config
from amldist.errors import UserError


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (the schema uses postponed annotations)."""
    return typing.get_type_hints(cls)


def split_key(key: str) -> tuple[str | None, str]:
    """'optim.lr' -> ('optim', 'lr'); 'description' -> (None, 'description'); unknown -> UserError."""
    parts = str(key).split(".")
    if len(parts) == 1 and parts[0] in TOP_LEVEL_FIELDS:
        return None, parts[0]
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise UserError(f"unknown config key {key!r}; keys are SECTION.FIELD with SECTION one of "
                        f"{', '.join(SECTIONS)}")
    section, name = parts
    known = field_types(SECTIONS[section])
    if name not in known:
        raise UserError(f"unknown config key {key!r}; {section} has {', '.join(known)}")
    return section, name


def parse_scalar(text: str) -> Any:
    """A command-line value read as a YAML scalar ('0.7' -> 0.7, 'true' -> True, 'null' -> None)."""
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """`value` checked (and, where lossless, converted) against a field's type."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (annotation,) = [arg for arg in args if arg is not type(None)]
    if value is None:
        raise UserError(f"{key}: a value is required (got null)")
    converter = _CONVERTERS.get(annotation)
    if converter is None:
        raise TypeError(f"config field {key} has an unsupported type {annotation!r}")
    return converter(key, value)


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise UserError(f"{key}: expected true or false, got {value!r}")


def _to_float(key: str, value: Any) -> float:
    # PyYAML reads '1e-5' (no dot) as a string, so numeric strings are accepted here.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{key}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"{key}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UserError(f"{key}: expected a finite number, got {value!r}")
    return number


def _to_int(key: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = _to_float(key, value) if isinstance(value, (float, str)) else None
    if number is None or not number.is_integer():
        raise UserError(f"{key}: expected an integer, got {value!r}")
    return int(number)


def _to_str(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a run name of digits, which YAML reads as a number
    raise UserError(f"{key}: expected a string, got {value!r}")


_CONVERTERS = {bool: _to_bool, float: _to_float, int: _to_int, str: _to_str}


def expand_dotted(data: Mapping[str, Any]) -> dict[str, Any]:
    """A nested dict in which dotted top-level keys ('optim.lr': 1e-3) are moved into their section."""
    nested: dict[str, Any] = {}
    dotted = []
    for key, value in data.items():
        if "." in str(key):
            dotted.append((key, value))
        elif isinstance(value, Mapping):
            nested[key] = dict(value)
        else:
            nested[key] = value
    for key, value in dotted:
        set_in(nested, key, value)
    return nested


def set_in(nested: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in a nested dict, after checking the key exists in the schema."""
    section, name = split_key(key)
    if section is None:
        nested[name] = value
        return
    target = nested.setdefault(section, {})
    if not isinstance(target, dict):
        raise UserError(f"{section}: expected a mapping of fields, got {target!r}")
    target[name] = value


def build_config(data: Mapping[str, Any]) -> Config:
    """Typed Config from a nested dict, every key checked and every value type-checked.

    Missing keys keep their defaults; nothing is resolved or range-checked here.
    """
    if not isinstance(data, Mapping):
        raise UserError(f"a configuration must be a mapping of sections, got {type(data).__name__}")
    data = expand_dotted(data)
    sections = {}
    for key in data:
        if key not in SECTIONS and key not in TOP_LEVEL_FIELDS:
            raise UserError(f"unknown config section {key!r}; sections are {', '.join(SECTIONS)}")
    for section, cls in SECTIONS.items():
        values = data.get(section)  # `mining:` with nothing under it is YAML's null: an empty section
        sections[section] = _build_section(section, cls, {} if values is None else values)
    top = {name: coerce(name, data[name], str) for name in TOP_LEVEL_FIELDS if name in data}
    return Config(**top, **sections)


def _build_section(section: str, cls: type, values: Any) -> Any:
    if not isinstance(values, Mapping):
        raise UserError(f"{section}: expected a mapping of fields, got {values!r}")
    types_by_name = field_types(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{section}.{name}"
        if name not in types_by_name:
            raise UserError(f"unknown config key {key!r}; {section} has {', '.join(types_by_name)}")
        kwargs[name] = coerce(key, value, types_by_name[name])
    return cls(**kwargs)


def config_to_dict(config: Config) -> dict[str, Any]:
    """Nested plain dict (YAML/JSON-able); `config_from_dict` reads it back to an equal Config."""
    return dataclasses.asdict(config)


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
