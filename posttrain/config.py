"""Stage configs: YAML files + `key.sub=value` overrides -> typed dataclasses, strictly.

An unknown key anywhere raises ConfigError naming its dotted path and the keys that are
allowed, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from posttrain.model.args import ConfigError


def load_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`train.lr=1e-5` sets data["train"]["lr"]; `data.sources.0.path=x` indexes lists; values
    are parsed as YAML (numbers, booleans, lists, ...)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"override {key}: no item {p} in a list of {len(node)}")
                node = node[int(p)]
            else:
                node = node.setdefault(p, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {key}: {p} is not a section")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override {key}: no item {last} in a list of {len(node)}")
            node[int(last)] = yaml.safe_load(raw)
        else:
            node[last] = yaml.safe_load(raw)
    return data


def build(cls, data: dict | None, where: str = ""):
    """Instantiate dataclass `cls` from a dict, recursing into dataclass-typed fields."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {[where + k for k in unknown]}; {where or 'top level'} takes {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        target = _dataclass_in(hint)
        if target is not None and isinstance(value, dict):
            kwargs[name] = build(target, value, f"{where}{name}.")
        elif target is not None and isinstance(value, list) and _list_of_dataclass(hint):
            kwargs[name] = [build(target, v, f"{where}{name}[{i}].") if isinstance(v, dict) else v
                            for i, v in enumerate(value)]
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = _number(hint, value, where + name)
    return cls(**kwargs)


def _accepts(hint, kind) -> bool:
    return hint is kind or kind in typing.get_args(hint)


def _number(hint, value, path: str):
    """YAML 1.1 reads `1e-3` (no dot) as a string; a float field takes it as the number meant."""
    if isinstance(value, str) and _accepts(hint, float) and not _accepts(hint, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    return value


def _dataclass_in(hint):
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


def _list_of_dataclass(hint) -> bool:
    return typing.get_origin(hint) is list and any(dataclasses.is_dataclass(a) for a in typing.get_args(hint))


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)
