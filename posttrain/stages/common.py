"""Small pieces every stage's entry point shares: required keys, local inputs, text options."""

from __future__ import annotations

import sys
from pathlib import Path

from posttrain.model.args import ConfigError


def require(cfg, *keys: str) -> None:
    """ConfigError naming each dotted key of `cfg` that is unset (None or empty)."""
    missing = []
    for key in keys:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part, None)
        if value in (None, "", []):
            missing.append(key)
    if missing:
        raise ConfigError(f"{', '.join(missing)} required (set {' and '.join(k + '=...' for k in missing)}, "
                          "or the flag for it)")


def local_inputs(*paths) -> list[Path]:
    """The paths among `paths` that exist here (files or directories), for fingerprints and the
    output-is-input check; recipes, hub names and specs like `distill:DIR` are resolved first."""
    out = []
    for p in paths:
        if not p:
            continue
        text = str(p)
        if text.startswith("distill:"):
            text = text[len("distill:"):]
        if Path(text).exists():
            out.append(Path(text))
    return out


def text_option(value: str | None, key: str) -> str | None:
    """A text setting that may name a file as @FILE."""
    if value is None or not value.startswith("@"):
        return value
    path = Path(value[1:])
    try:
        return path.read_text()
    except OSError as e:
        raise ConfigError(f"{key}={value}: cannot read {path} ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{key}={value}: {path} is not UTF-8 text") from None


def say(message: str) -> None:
    """A line for the person running the stage (stderr: stdout carries results)."""
    print(message, file=sys.stderr, flush=True)
