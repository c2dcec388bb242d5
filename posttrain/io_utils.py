"""Small file helpers every stage uses: atomic writes so a crash never leaves a torn file."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write to a temporary sibling, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full or read-only disk: the error names the file, not a temporary
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_jsonl(path: str | os.PathLike, raw: bool = False):
    """Yield (line number, object or None, reason or None) for each non-blank line; with
    `raw`, a fourth item: the start of the line as text (what a rejects row can show of it).

    A line that is not UTF-8, not JSON, nested too deeply, not a JSON object, or holding a
    lone surrogate (text no UTF-8 file can store) comes back with the reason instead of
    stopping the read, so callers can put it in their rejects file.
    """
    import gzip

    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            rec, why = None, None
            try:
                rec = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                why = "not UTF-8"
            except json.JSONDecodeError as e:
                why = f"invalid JSON: {e.msg} at column {e.colno}"
            except RecursionError:
                why = "JSON nested too deeply"
            if why is None and not isinstance(rec, dict):
                rec, why = None, f"a line must be a JSON object, got {type(rec).__name__}"
            if why is None:
                try:
                    json.dumps(rec, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError:
                    rec, why = None, "the text holds a lone surrogate (not valid Unicode)"
                except RecursionError:
                    rec, why = None, "JSON nested too deeply"
            if raw:
                yield n, rec, why, line[:500].decode("utf-8", "replace").rstrip("\n")
            else:
                yield n, rec, why


def record_problem(rec: dict, required: dict[str, type | tuple[type, ...]]) -> str | None:
    """Why a JSON record lacks what a stage needs (the first missing or mistyped field), or None."""
    for key, types in required.items():
        if key not in rec:
            return f"missing field {key!r}"
        if not isinstance(rec[key], types):
            return f"field {key!r} has the wrong type"
    return None


def truncate_jsonl(path: str | os.PathLike, keep) -> None:
    """Rewrite a jsonl log keeping the rows `keep(row)` accepts (a resumed run drops the rows it
    is about to write again); atomic, and a no-op when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if line.strip() and keep(json.loads(line)):
                kept.append(line + "\n")
        except json.JSONDecodeError:
            continue  # a torn last line from a killed run
    atomic_write_text(path, "".join(kept))
