"""Running untrusted Python: one program per call, isolated, bounded, and always cleaned up.

`Sandbox.run(files, args, stdin)` starts sandbox_launcher.py in a new session (its own
process group), which isolates and execs the program (see the launcher's docstring for the
layers). This side enforces the wall-clock deadline and output caps: at the deadline, or
when stdout/stderr exceed their cap, the whole process group is SIGKILLed; in full isolation
the program is PID 1 of its own PID namespace, so everything it spawned dies with it.

Parallel calls are spread over `max_parallel` slots (default: the CPU count), each with its
own uid in full isolation, and sandboxed programs run at nice 10 with a CPU-time rlimit, so
many concurrent runs never starve the machine or each other.

A harness can report results on an extra pipe (`report_fd`, fd 3 in the program) instead of
stdout, which the program itself also writes to.
"""

from __future__ import annotations

import json
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
REPORT_FD = 3
_PY_MOUNT = "/tmp/.python"  # where the interpreter's installation appears inside full isolation


@dataclass
class SandboxLimits:
    wall_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    tmpfs_bytes: int = 64 << 20
    nproc: int = 64
    nofile: int = 256
    output_bytes: int = 1 << 20


@dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    report: str              # what the program wrote to its report fd
    timed_out: bool
    output_limited: bool     # killed for writing more than output_bytes
    wall_s: float
    isolation: str           # "full" (namespaces + uid + rlimits) or "rlimits"

    @property
    def signal_name(self) -> str | None:
        if self.returncode is not None and self.returncode > 128:
            try:
                return signal.Signals(self.returncode - 128).name
            except ValueError:
                return None
        return None

    def failure_reason(self) -> str | None:
        """Why the run did not end normally, in words; None if it exited 0."""
        if self.timed_out:
            return f"timed out after {self.wall_s:.1f}s"
        if self.output_limited:
            return "output limit exceeded"
        if self.returncode == 125 and self.stderr.startswith("sandbox:"):
            return self.stderr.strip()
        if self.signal_name:
            return {"SIGXCPU": "CPU time limit exceeded", "SIGXFSZ": "file size limit exceeded",
                    "SIGSEGV": "segmentation fault"}.get(self.signal_name, f"killed by {self.signal_name}")
        if self.returncode:
            tail = self.stderr.strip().splitlines()[-1:] or [""]
            return f"exit code {self.returncode}: {tail[0][:200]}"
        return None


class Sandbox:
    _instances = 0
    _instances_lock = threading.Lock()

    def __init__(self, max_parallel: int | None = None, uid_base: int | None = None, isolate: bool = True):
        self.max_parallel = max_parallel or os.cpu_count() or 2
        if uid_base is None:  # each sandbox in a process gets its own uids, so their limits never mix
            with Sandbox._instances_lock:
                uid_base = 61000 + 256 * Sandbox._instances
                Sandbox._instances += 1
        self.uid_base = uid_base
        self._slots: queue.Queue[int] = queue.Queue()
        for k in range(self.max_parallel):
            self._slots.put(k)
        self._host_dir = Path(tempfile.mkdtemp(prefix="posttrain-sandbox-"))
        self._counter = 0
        self._lock = threading.Lock()
        self.isolation = "rlimits"
        if isolate and os.geteuid() == 0:
            self.isolation = "full"
            probe = self.run({"probe.py": "print('ok')"}, ["probe.py"], limits=SandboxLimits(wall_s=30))
            if probe.stdout.strip() != "ok":
                self.isolation = "rlimits"

    # ------------------------------------------------------------------ run
    def run(self, files: dict[str, str], args: list[str], stdin: str | bytes | None = None,
            limits: SandboxLimits | None = None, python: bool = True) -> SandboxResult:
        """Write `files` into a fresh working directory and run `python -I args...` there."""
        limits = limits or SandboxLimits()
        slot = self._slots.get()
        try:
            return self._run(slot, files, args, stdin, limits, python)
        finally:
            self._slots.put(slot)

    def _interpreter(self) -> tuple[str, dict[str, str]]:
        real = os.path.realpath(sys.executable)
        if self.isolation != "full":
            return real, {}
        rel = os.path.relpath(real, sys.base_prefix)
        if rel.startswith(".."):
            return real, {}
        return os.path.join(_PY_MOUNT, rel), {"LD_LIBRARY_PATH": os.path.join(_PY_MOUNT, "lib")}

    def _run(self, slot, files, args, stdin, limits, python) -> SandboxResult:
        with self._lock:
            self._counter += 1
            run_id = self._counter
        full = self.isolation == "full"
        host_dir = None
        if full:
            workdir = "/tmp/sandbox"  # inside the program's private /tmp tmpfs
        else:
            host_dir = self._host_dir / f"run-{run_id}"
            host_dir.mkdir()
            workdir = str(host_dir)
        interpreter, extra_env = self._interpreter()
        argv = ([interpreter, "-I", "-B"] if python else []) + list(args)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", **extra_env}
        cfg_r, cfg_w = os.pipe()
        rep_r, rep_w = os.pipe()
        cfg = {
            "report_fd": rep_w,
            "workdir": workdir, "files": files, "argv": argv, "env": env,
            "uid": self.uid_base + slot, "gid": self.uid_base + slot,
            "isolate": full, "require_isolation": full, "nice": 10,
            "python_prefix": sys.base_prefix, "python_mount": _PY_MOUNT,
            "limits": {"cpu_s": limits.cpu_s, "memory_bytes": limits.memory_bytes, "file_bytes": limits.file_bytes,
                       "tmpfs_bytes": limits.tmpfs_bytes, "nproc": limits.nproc, "nofile": limits.nofile},
        }
        # The launcher gets the config on cfg_r and hands rep_w to the program as fd 3.
        launcher = [sys.executable, "-I", "-S", str(LAUNCHER), str(cfg_r)]
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(
                launcher, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(cfg_r, rep_w), start_new_session=True, env={"PATH": env["PATH"]},
            )
        finally:
            os.close(cfg_r)
            os.close(rep_w)
        with os.fdopen(cfg_w, "wb") as f:
            f.write(json.dumps(cfg).encode())
        try:
            out = _collect(proc, rep_r, stdin, limits, t0)
        finally:
            os.close(rep_r)
            if host_dir is not None:
                shutil.rmtree(host_dir, ignore_errors=True)
        stdout, stderr, report, timed_out, limited = out
        return SandboxResult(proc.returncode, stdout, stderr, report, timed_out, limited,
                             time.monotonic() - t0, self.isolation)

    def close(self) -> None:
        shutil.rmtree(self._host_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc."""
    kids = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid):
            kids.append(int(status.parent.name))
    return kids


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the program first so that the launcher reaps it (a process orphaned by killing
    the launcher first would be left to the host's init, which may never reap it), then the
    launcher's whole process group."""
    if proc.poll() is None:
        for child in _children(proc.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect(proc, rep_r, stdin, limits: SandboxLimits, t0: float):
    """Feed stdin, read stdout/stderr/report with caps until exit or deadline."""
    sel = selectors.DefaultSelector()
    bufs = {"out": bytearray(), "err": bytearray(), "rep": bytearray()}
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    sel.register(rep_r, selectors.EVENT_READ, "rep")
    data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
    try:
        if data:
            proc.stdin.write(data)
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass  # the program did not read its input
    timed_out = limited = False
    deadline = t0 + limits.wall_s
    open_streams = 3
    while open_streams:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        for key, _ in sel.select(timeout=min(remaining, 0.5)):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            buf = bufs[key.data]
            buf += chunk
            if len(buf) > limits.output_bytes:
                limited = True
        if limited:
            break
    sel.close()
    if timed_out or limited:
        _kill_group(proc)
    try:
        proc.wait(timeout=max(0.1, deadline - time.monotonic()) if not (timed_out or limited) else 5)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        proc.wait()
    try:  # anything left in the group (rlimits-only mode has no PID namespace to do this)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    cap = limits.output_bytes
    dec = lambda b: bytes(b[:cap]).decode("utf-8", "replace")  # noqa: E731
    return dec(bufs["out"]), dec(bufs["err"]), dec(bufs["rep"]), timed_out, limited
