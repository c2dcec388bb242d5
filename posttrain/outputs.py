"""What a stage may do to its output: never destroy what it did not write, never write over
its own input, and resume only what it would compute again.

Every output (a directory, or a file) gets a record beside it: `posttrain-run.json` inside an
output directory, `<file>.posttrain-run.json` beside an output file. It names the stage, and
holds the resolved config and a fingerprint of every input. It is what makes an output a
stage's own. `config.yaml` (or `<file>.config.yaml`) beside it holds the same config, ready to
pass back with `--config`.

    claim = claim_output("sft", out_dir, cfg, inputs=[data files, model dir], overwrite, restart)
    claim.state  # "new" | "resume" | "restart"

Rules:
* an existing output that is not empty and holds no record of this stage is refused (the user's
  directory, another tool's file, another stage's run), unless `overwrite`: then the stage
  writes its files there, replacing only files of the same names;
* an output that is, contains, or lies inside one of the inputs is refused always;
* a record of this stage with the same config and inputs: the run resumes (or, for a stage
  that cannot resume, does its work again over its own files);
* a record with another config or other inputs: refused, naming the keys that differ, unless
  `restart`, which starts over (the stage may then remove what its record says it wrote).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.config import changed_keys, dump_yaml, to_dict
from posttrain.io_utils import atomic_write_json, atomic_write_text

RECORD = "posttrain-run.json"
CONFIG = "config.yaml"


class OutputError(RuntimeError):
    """An output the stage refuses to write (one line: the path and the fix)."""


def record_path(out: Path, is_dir: bool) -> Path:
    return out / RECORD if is_dir else out.with_name(out.name + "." + RECORD)


def config_path(out: Path, is_dir: bool) -> Path:
    return out / CONFIG if is_dir else out.with_name(out.name + "." + CONFIG)


def fingerprint(path: Path) -> str:
    """Size and modification time of every file under `path` (a file or a directory): cheap for
    checkpoints of any size, and any rewrite of an input changes it."""
    h = hashlib.sha256()
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != RECORD)
    elif path.exists():
        files = [path]
    else:
        return "missing"
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _inside(a: Path, b: Path) -> bool:
    """a is b, or lies under it."""
    return a == b or b in a.parents


@dataclass
class Claim:
    out: Path
    is_dir: bool
    state: str                       # "new" | "resume" | "restart"
    previous: dict | None = None     # the record found, if any
    notes: list[str] = field(default_factory=list)

    @property
    def record(self) -> Path:
        return record_path(self.out, self.is_dir)


def claim_output(stage: str, out: str | Path, config, inputs: list[str | Path] = (), *, is_dir: bool = True,
                 overwrite: bool = False, restart: bool = False, ignore: tuple[str, ...] = ()) -> Claim:
    """Check the output against the rules above, then write its record and config (the output
    is then this stage's). `ignore`: config keys that do not change what the run computes."""
    out = Path(out)
    resolved = out.resolve()
    if resolved == Path("/") or resolved == Path.home().resolve():
        raise OutputError(f"{out}: refusing to write a stage's output into / or the home directory itself; "
                          "name a directory for it")
    real_inputs = [Path(p) for p in inputs if p]
    for p in real_inputs:
        rp = Path(p).resolve()
        if _inside(resolved, rp) or _inside(rp, resolved):
            raise OutputError(f"{out}: the output would be written {'over' if resolved == rp else 'around'} the input "
                              f"{p}; choose another output path")
    if not is_dir and out.is_dir():
        raise OutputError(f"{out} is a directory; the output is a file: give a file name")
    if is_dir and out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file; the output is a directory: give a directory name")
    config_dict = to_dict(config)
    prints = {str(p): fingerprint(p) for p in real_inputs}
    rec_path = record_path(out, is_dir)
    previous = _read_record(rec_path)
    occupied = (out.is_dir() and any(out.iterdir())) if is_dir else out.exists()
    state, notes = "new", []
    if previous is not None and previous.get("stage") != stage:
        if not overwrite:
            raise OutputError(f"{out} holds the output of `posttrain {previous.get('stage')}`, not `posttrain {stage}`; "
                              "choose another output path (or pass --overwrite to write into it anyway)")
        previous = None
    if previous is None and occupied:
        if not overwrite:
            what = "directory is not empty" if is_dir else "file exists"
            raise OutputError(f"{out}: the {what} and was not written by `posttrain {stage}`; choose another "
                              "output path, or pass --overwrite to write this stage's files there (nothing else "
                              "is removed)")
        notes.append("writing into an existing output (--overwrite)")
    if previous is not None:
        differ = changed_keys(previous.get("config", {}), config_dict, ignore)
        moved = sorted(k for k in set(previous.get("inputs", {})) | set(prints)
                       if previous.get("inputs", {}).get(k) != prints.get(k))
        if differ or moved:
            if not restart:
                what = [f"config key(s) {', '.join(differ)}" if differ else "",
                        f"input(s) {', '.join(moved)} changed" if moved else ""]
                raise OutputError(f"{out} holds a `posttrain {stage}` run with other settings "
                                  f"({'; '.join(w for w in what if w)}); rerun with its config ({config_path(out, is_dir)}), "
                                  "choose another output path, or pass --restart to start over")
            state = "restart"
        else:
            state = "restart" if restart else "resume"
    try:
        (out if is_dir else out.parent).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create the output ({e.strerror}); choose a writable output path") from None
    write_in_place(out if is_dir else out.parent)
    atomic_write_json(rec_path, {"stage": stage, "config": config_dict, "inputs": prints})
    atomic_write_text(config_path(out, is_dir), dump_yaml(config))
    return Claim(out, is_dir, state, previous, notes)


def _read_record(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "stage" in data else None


def owned_by(path: Path, marker: str) -> bool:
    """Whether a directory carries a stage's own marker file (checkpoint rotation, restarts)."""
    return (Path(path) / marker).is_file()


def remove_owned(path: Path, marker: str) -> bool:
    """Remove a directory only if it carries `marker`; returns whether it did."""
    import shutil

    if not owned_by(path, marker):
        return False
    shutil.rmtree(path)
    return True


def install_files(tmp: Path, out: Path, stale=lambda path: False) -> None:
    """Move every file of the directory `tmp` into `out` (created if needed), one by one; a
    file already in `out` for which `stale(path)` holds and that `tmp` does not replace is
    removed (a stage's own earlier output), anything else in `out` stays."""
    out.mkdir(parents=True, exist_ok=True)
    new = {p.name for p in tmp.iterdir()}
    for path in list(out.iterdir()):
        if path.is_file() and path.name not in new and stale(path):
            path.unlink()
    for path in tmp.iterdir():
        os.replace(path, out / path.name)
    tmp.rmdir()


def write_in_place(path: Path) -> None:
    """Guard against writing into a read-only place before the work starts: a one-line error."""
    probe = path / f".posttrain-write-test-{os.getpid()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"{path}: cannot write here ({e.strerror}); choose a writable output path") from None
