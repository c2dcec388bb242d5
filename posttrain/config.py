"""The one config system of every stage: typed dataclasses read from YAML, with `key.sub=value`
overrides and command-line flags that are aliases of keys, validated in one place.

    cfg = load_config(SFTConfig, "configs/sft/tiny.yaml", ["train.lr=1e-5"])

* Unknown keys fail, naming the dotted key and the keys allowed there.
* Types are checked (an int field takes an int, a float field an int or a float; numbers are
  finite), and every field declared with `setting(...)` is checked against its range or
  choices; an error names the key, the value and what is allowed.
* Override values are read as YAML (numbers, booleans, lists), except for a text field, which
  takes the text as written (`prompts.system_prompt=yes` is the word "yes"); `null` is None.
* The resolved config of a run is written beside its output (posttrain/outputs.py).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import yaml

from posttrain.model.args import ConfigError

MISSING = dataclasses.MISSING


def setting(default: Any = MISSING, *, factory=None, ge=None, gt=None, le=None, lt=None, choices=None):
    """A dataclass field with the range or choices its value must satisfy."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices).items() if v is not None}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ------------------------------------------------------------------ reading
def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def _hint_at(cls, parts: list[str]):
    """The type hint of the dotted key `parts` under dataclass `cls` (None where unknown)."""
    hint = cls
    for p in parts:
        target = _dataclass_in(hint)
        if target is not None:
            hints = typing.get_type_hints(target)
            if p not in hints:
                return None
            hint = hints[p]
        elif typing.get_origin(hint) is list and p.isdigit():
            args = typing.get_args(hint)
            hint = args[0] if args else None
        else:
            return None
    return hint


def _parse(raw: str, hint) -> Any:
    """A command-line value for a field of type `hint`: text as written for text fields."""
    if raw in ("null", "~", "None"):
        return None
    if hint is not None and _accepts(hint, str) and not any(_accepts(hint, t) for t in (int, float, bool, list, dict)):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def set_key(data: dict, key: str, value: Any) -> None:
    """data[k1][k2]... = value for the dotted `key` (list items by index)."""
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"{key}: no item {p} in a list of {len(node)}")
            node = node[int(p)]
        else:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{key}: {p} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{key}: no item {last} in a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(data: dict, overrides: list[str], cls=None) -> dict:
    """`train.lr=1e-5` sets data["train"]["lr"]; `data.sources.0.path=x` indexes lists. With
    `cls`, text fields take their value as written."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        set_key(data, key, _parse(raw, _hint_at(cls, key.split(".")) if cls else None))
    return data


def load_config(cls, path: str | Path | None = None, overrides: list[str] = (), aliases: dict[str, Any] | None = None):
    """YAML file (optional) < aliases (key -> value, from flags) < key=value overrides."""
    data = load_yaml(path) if path else {}
    for key, value in (aliases or {}).items():
        set_key(data, key, value)
    return build(cls, apply_overrides(data, list(overrides), cls))


# ----------------------------------------------------------------- building
def build(cls, data: dict | None, where: str = ""):
    """Instantiate dataclass `cls` from a dict, recursing into dataclass-typed fields, checking
    types and the `setting` constraints."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'the config'}: expected a mapping of keys, got {_show(data)}")
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(where + k for k in unknown)}; "
                          f"{where.rstrip('.') or 'the top level'} takes {', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if "internal" in fields[name].metadata:
            raise ConfigError(f"{where}{name} is not set by hand: {fields[name].metadata['internal']}")
        kwargs[name] = _convert(hints[name], value, where + name)
        _check_value(fields[name], kwargs[name], where + name)  # before a __post_init__ compares fields
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:  # a dataclass's own __post_init__ check
        raise ConfigError(f"{where.rstrip('.') or 'the config'}: {e}") from None
    check(obj, where)
    return obj


def _convert(hint, value, path: str):
    if value is None:
        if _optional(hint):
            return None
        raise ConfigError(f"{path}=null: a value is required ({_describe(hint)})")
    target = _dataclass_in(hint)
    if target is not None and isinstance(value, dict):
        return build(target, value, path + ".")
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _convert(args[0], value, path)
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}={_show(value)}: expected a list")
        item = args[0] if args else Any
        return [_convert(item, v, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args and len(value) != len(args)):
            raise ConfigError(f"{path}={_show(value)}: expected {len(args)} values")
        return tuple(_convert(a, v, f"{path}.{i}") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={_show(value)}: expected a mapping")
        return value
    if hint is Any or hint is object:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={_show(value)}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{path}={_show(value)}: expected a whole number")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path}={_show(value)}: expected a number") from None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}={_show(value)}: expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{path}={_show(value)}: expected a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={_show(value)}: expected text")
        return value
    if args:  # a union of plain types: accept the first that fits
        for a in args:
            try:
                return _convert(a, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}={_show(value)}: expected {_describe(hint)}")
    return value


def check(obj, where: str = "") -> None:
    """Each `setting` field of `obj` (recursively) within its range and choices."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = where + f.name
        if dataclasses.is_dataclass(value):
            check(value, path + ".")
            continue
        if isinstance(value, list):
            for i, v in enumerate(value):
                if dataclasses.is_dataclass(v):
                    check(v, f"{path}.{i}.")
        _check_value(f, value, path)


def _check_value(f: dataclasses.Field, value, path: str) -> None:
    meta = f.metadata
    if not meta or value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{path}={_show(value)}: one of {', '.join(map(str, meta['choices']))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}={_show(value)}: expected a finite number")
        for op, bound, ok in (("ge", ">=", value >= meta.get("ge", -math.inf)),
                              ("gt", ">", value > meta.get("gt", -math.inf)),
                              ("le", "<=", value <= meta.get("le", math.inf)),
                              ("lt", "<", value < meta.get("lt", math.inf))):
            if op in meta and not ok:
                raise ConfigError(f"{path}={_show(value)}: must be {bound} {meta[op]}")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _optional(hint) -> bool:
    return hint is Any or type(None) in typing.get_args(hint)


def _accepts(hint, kind) -> bool:
    if hint is kind:
        return True
    origin = typing.get_origin(hint)
    if kind in (list, dict) and (origin is kind):
        return True
    return any(_accepts(a, kind) for a in typing.get_args(hint)) if origin not in (list, dict, tuple) else False


def _dataclass_in(hint):
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (list, dict, tuple):
        return None
    for arg in typing.get_args(hint):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


# ----------------------------------------------------------------- comparing
def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def flatten(data, prefix: str = "") -> dict[str, Any]:
    """{"train.lr": 1e-5, "data.sources.0.path": ...} from nested dicts and lists."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(data, (list, tuple)) and any(isinstance(v, (dict, list)) for v in data):
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = list(data) if isinstance(data, tuple) else data
    return out


def changed_keys(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two resolved configs (`ignore`: prefixes that do
    not change what a run computes, like progress bars)."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b)
                  if a.get(k, MISSING) != b.get(k, MISSING) and not any(k == p or k.startswith(p + ".") for p in ignore))


def dump_yaml(obj) -> str:
    return yaml.safe_dump(to_dict(obj) if dataclasses.is_dataclass(obj) else obj, sort_keys=False,
                          allow_unicode=True)
