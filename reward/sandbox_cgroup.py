"""One memory and process limit for a whole sandboxed job, through a cgroup.

Each sandbox slot gets its own cgroup (made once, reused by every job of the slot, removed on
close); the launcher joins it before it starts anything, so every process of the job, and
every page it charges (heap, tmpfs files), counts against one `memory.max`. What is
available is found once:
  * cgroup v2, where this process's cgroup can hand the memory and pids controllers to
    children (the root of a container's cgroup namespace, or a delegated subtree);
  * cgroup v1, where the memory (and pids) hierarchies are writable;
  * otherwise None: the sandbox falls back to a bound of processes x address space
    (reward/sandbox.py), which cannot exceed the same total.
"""

from __future__ import annotations

import os
from pathlib import Path


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) from /proc/self/mountinfo."""
    out = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3:
            out.append((fields[4].replace("\\040", " "), tail[0], tail[2]))
    return out


def _own_cgroups() -> dict[str, str]:
    """controller (or "" for v2) -> this process's cgroup path."""
    out = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for c in (controllers.split(",") if controllers else [""]):
            out[c] = path
    return out


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class SlotCgroups:
    """cgroups named `<prefix>-<slot>` with one memory limit (no swap) and a process limit."""

    def __init__(self, prefix: str, slots: int):
        self.kind: str | None = None
        self.dirs: list[list[Path]] = []     # per slot: the directories to join (one per hierarchy)
        self._made: list[Path] = []
        self._limits: dict[int, tuple[int, int]] = {}
        if os.geteuid() != 0 or slots == 0:
            return
        for kind, finder in (("v2", self._v2_bases), ("v1", self._v1_bases)):
            bases = finder()
            if not bases:
                continue
            try:
                for slot in range(slots):
                    self.dirs.append([self._make(base / f"{prefix}-{slot}") for _, base in bases])
                self.kind = kind
                for slot in range(slots):  # writable limits, or try the next kind
                    self.limit(slot, 1 << 30, 64)
                self._limits = {}
                return
            except OSError:
                self.close()
                self.dirs, self.kind = [], None

    # ------------------------------------------------------------ discovery
    @staticmethod
    def _v2_bases(enable: bool = True) -> list[tuple[str, Path]]:
        own = _own_cgroups().get("")
        mount = next((m for m, fs, _ in _mounts() if fs == "cgroup2"), None)
        if own is None or mount is None:
            return []
        base = Path(mount) / own.lstrip("/")
        try:
            available = (base / "cgroup.controllers").read_text().split()
            if not {"memory", "pids"} <= set(available):
                return []
            enabled = (base / "cgroup.subtree_control").read_text().split()
            if not {"memory", "pids"} <= set(enabled):
                if not enable:
                    return []
                _write(base / "cgroup.subtree_control", "+memory +pids")
        except OSError:
            return []
        return [("", base)]

    @staticmethod
    def _v1_bases() -> list[tuple[str, Path]]:
        own = _own_cgroups()
        bases = []
        for controller in ("memory", "pids"):
            mount = next((m for m, fs, opts in _mounts() if fs == "cgroup" and controller in opts.split(",")), None)
            if mount is None or controller not in own:
                if controller == "memory":
                    return []
                continue  # no pids hierarchy: the memory limit still holds; nproc bounds processes
            bases.append((controller, Path(mount) / own[controller].lstrip("/")))
        return bases

    def _make(self, path: Path) -> Path:
        path.mkdir(exist_ok=True)
        self._made.append(path)
        return path

    def limit(self, slot: int, memory_bytes: int, max_pids: int) -> None:
        """Set the slot's memory limit (no swap) and process limit, before a job joins it."""
        if not self.kind or self._limits.get(slot) == (memory_bytes, max_pids):
            return
        self._limits[slot] = (memory_bytes, max_pids)
        for path in self.dirs[slot]:
            if self.kind == "v2":
                _write(path / "memory.max", str(memory_bytes))
                if (path / "memory.swap.max").exists():
                    _write(path / "memory.swap.max", "0")
                if (path / "memory.oom.group").exists():  # an OOM kill takes the whole job, not one process
                    _write(path / "memory.oom.group", "1")
            elif (path / "memory.limit_in_bytes").exists():
                if (path / "memory.memsw.limit_in_bytes").exists():  # memsw >= limit at every moment
                    _write(path / "memory.memsw.limit_in_bytes", "-1")
                _write(path / "memory.limit_in_bytes", str(memory_bytes))
                if (path / "memory.memsw.limit_in_bytes").exists():
                    _write(path / "memory.memsw.limit_in_bytes", str(memory_bytes))
            if (path / "pids.max").exists():
                _write(path / "pids.max", str(max_pids))

    @classmethod
    def leftovers(cls, prefix: str) -> list[Path]:
        """Existing cgroups whose names start with `prefix`, in every hierarchy this process
        could have made them in."""
        if os.geteuid() != 0:
            return []
        bases = [base for _, base in cls._v2_bases(enable=False) + cls._v1_bases()]
        return [p for base in bases if base.is_dir() for p in base.glob(prefix + "*") if p.is_dir()]

    # ------------------------------------------------------------------ use
    def procs_files(self, slot: int) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs[slot]] if self.kind else []

    def oom_kills(self, slot: int) -> int:
        """How many processes of this slot the kernel has killed for memory, so far."""
        if not self.kind:
            return 0
        memory_dir = self.dirs[slot][0]
        name = "memory.events" if self.kind == "v2" else "memory.oom_control"
        try:
            for line in (memory_dir / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
            if self.kind == "v1":  # kernels without the oom_kill count: the limit's failure count
                return int((memory_dir / "memory.failcnt").read_text())
        except (OSError, ValueError):
            pass
        return 0

    def wait_empty(self, slot: int, timeout_s: float = 5.0) -> bool:
        """Wait until no process is left in the slot's cgroup (its memory is then released)."""
        import time

        if not self.kind:
            return True
        deadline = time.monotonic() + timeout_s
        files = [d / "cgroup.procs" for d in self.dirs[slot]]
        while True:
            try:
                if not any(f.read_text().strip() for f in files):
                    return True
            except OSError:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)

    def close(self) -> None:
        for path in reversed(self._made):
            try:
                path.rmdir()
            except OSError:
                pass
        self._made = []
