"""Running untrusted Python: isolated, bounded, always cleaned up, and honest about how.

`Sandbox.run(files, args, stdin)` runs one program; `Sandbox.run_roles(...)` runs a job of
several programs ("roles") joined by pipes that the sandbox makes, such as the code reward's
solution and its tests. Both start sandbox_launcher.py in a new session (its own process
group), which isolates and execs the roles (see its docstring for the layers). This side
enforces the wall-clock deadline and the output caps: at the deadline, or when
stdout/stderr/report exceed their cap, the whole process group is SIGKILLed; in full
isolation the job is its own PID namespace, so everything it spawned dies with it.

Memory: one limit (`memory_total_bytes`) for the whole job through a cgroup where one can
be made (sandbox_cgroup.py); otherwise each process's address space is capped at
total / nproc and the solution's uid may run at most nproc processes, so the job still
cannot take more than the total (the tests role runs trusted code under its own uid and is
not counted in that fallback).

Isolation is probed once, at construction: "full" (namespaces, private filesystem view,
per-role uids, seccomp, rlimits) or "weak" (rlimits and seccomp, plus the uid switch as
root). A weak sandbox says so loudly, once per process; the code reward refuses to run on it
unless told `allow_weak_isolation`. A sandbox whose probe program cannot even run raises
SandboxUnavailable instead of scoring every program 0.

Programs see a clean environment, run at nice 10, and by default only the interpreter's
standard library (`site_packages=True` adds the interpreter's own site-packages, read-only).
Parallel jobs are spread over `max_parallel` slots, each with its own uids and cgroup.
"""

from __future__ import annotations

import atexit
import marshal
import os
import queue
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from .sandbox_cgroup import SlotCgroups

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
SETUP_FAILED = 125
_PY_MOUNT = "/python"   # where the interpreter's installation appears in full isolation
_READONLY = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc/ld.so.cache")
_WORKDIR = "/tmp/w"     # each role's working directory, inside its private /tmp
_FALLBACK_PROCESSES = 8  # without a cgroup: processes x address space = the total
_ROLES_PER_SLOT = 4


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run programs here, or only with weaker isolation than was required."""


@dataclass
class SandboxLimits:
    wall_s: float = 10.0
    cpu_s: int = 10                       # per process
    memory_bytes: int = 1 << 30           # address space per process
    memory_total_bytes: int = 1 << 30     # the whole job: every process and its tmpfs files
    file_bytes: int = 16 << 20
    tmpfs_bytes: int = 64 << 20
    nproc: int = 64                       # processes and threads
    nofile: int = 256
    output_bytes: int = 1 << 20           # per stream (stdout, stderr, report)

    def validate(self) -> "SandboxLimits":
        for name in ("wall_s", "cpu_s", "memory_bytes", "memory_total_bytes", "file_bytes", "tmpfs_bytes", "nproc",
                     "nofile", "output_bytes"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and value == value):
                raise ValueError(f"sandbox limit {name} must be a positive number, got {value!r}")
        return self


@dataclass
class Role:
    """One process of a job. `fds` maps an fd number in the program to "report" (the pipe whose
    contents come back as SandboxResult.report) or a channel end ("req.r", "resp.w", ...);
    `stdin`/`stdout` "host" connect to the job's stdin / captured stdout, "null" to /dev/null."""

    name: str
    files: dict[str, str | bytes]
    args: list[str]
    fds: dict[int, str] = field(default_factory=dict)
    stdin: str = "host"
    stdout: str = "host"
    primary: bool = False


@dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    report: bytes            # what the job wrote to its report fd, as written
    timed_out: bool
    output_limited: bool     # killed for writing more than output_bytes
    wall_s: float
    isolation: str           # "full" or "weak"
    memory_limited: bool = False  # the kernel killed a process of the job at the memory limit

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
        if self.memory_limited:
            return "memory limit exceeded"
        if self.returncode == SETUP_FAILED and self.stderr.startswith("sandbox:"):
            return scrub(self.stderr.strip().splitlines()[0])
        if self.signal_name:
            return {"SIGXCPU": "CPU time limit exceeded", "SIGXFSZ": "file size limit exceeded",
                    "SIGSEGV": "segmentation fault"}.get(self.signal_name, f"killed by {self.signal_name}")
        if self.returncode:
            tail = self.stderr.strip().splitlines()[-1:] or [""]
            return f"exit code {self.returncode}: {scrub(tail[0])}"
        return None


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def scrub(text: str, limit: int = 300) -> str:
    """Program output fit for a reason string: no control or direction characters, one line,
    at most `limit` characters."""
    return _CONTROL.sub("?", text.replace("\r", " ").replace("\n", " "))[:limit]


_warned_weak = False


def _warn_weak_once(why: str) -> None:
    global _warned_weak
    if not _warned_weak:
        _warned_weak = True
        banner = ("posttrain sandbox: WEAK ISOLATION. Untrusted code runs without namespaces or a private "
                  f"filesystem view ({why}). Code rewards refuse to run like this unless allow_weak_isolation=True.")
        print("!" * 100 + "\n" + banner + "\n" + "!" * 100, file=sys.stderr, flush=True)


class Sandbox:
    _instances = 0
    _instances_lock = threading.Lock()

    def __init__(self, max_parallel: int | None = None, uid_base: int | None = None, isolate: bool = True,
                 site_packages: bool = False, limits: SandboxLimits | None = None, memory_cgroup: bool = True,
                 python: str | None = None):
        """`limits`: the defaults of this sandbox's jobs. `memory_cgroup=False` uses the
        processes x address-space bound even where a cgroup could be made. `python`: the
        interpreter that runs the programs (default: this one's base interpreter), laid out
        as PREFIX/bin/python with its standard library under PREFIX/lib."""
        self.max_parallel = max_parallel or min(os.cpu_count() or 2, _SLOTS_PER_SANDBOX)
        if not 0 < self.max_parallel <= _SLOTS_PER_SANDBOX:
            raise ValueError(f"max_parallel must be between 1 and {_SLOTS_PER_SANDBOX}, got {self.max_parallel}")
        self.limits = (limits or SandboxLimits()).validate()
        if uid_base is None:  # each sandbox, in this process and beside others, gets its own uids
            with Sandbox._instances_lock:
                uid_base = _uid_base(Sandbox._instances)
                Sandbox._instances += 1
        self.uid_base = uid_base
        self.site_packages = site_packages
        self.python = python
        self._slots: queue.Queue[int] = queue.Queue()
        for k in range(self.max_parallel):
            self._slots.put(k)
        _remove_stale()
        self._host_dir = Path(tempfile.mkdtemp(prefix=f"posttrain-sandbox-{os.getpid()}-"))
        self._host_dir.chmod(0o711)  # weak isolation: each role's uid reaches its own (0700) directory
        (self._host_dir / "root").mkdir()
        self._counter = 0
        self._lock = threading.Lock()
        self.cgroups = SlotCgroups(f"posttrain-sandbox-{os.getpid()}-{uid_base}",
                                   self.max_parallel if memory_cgroup else 0)
        self.memory_limit = f"cgroup-{self.cgroups.kind}" if self.cgroups.kind else "rlimit-bound"
        _live.add(self)
        self.isolation, why = "weak", "not running as root"
        if isolate and os.geteuid() == 0:
            self.isolation = "full"
            probe = self.run({"probe.py": "print('ok')"}, ["probe.py"], limits=SandboxLimits(wall_s=30))
            if probe.stdout.strip() != "ok":
                self.isolation, why = "weak", f"namespaces unavailable: {scrub(probe.stderr.strip() or str(probe.returncode))}"
        elif not isolate:
            why = "isolation turned off"
        self.weak_reason = None
        if self.isolation == "weak":
            self.weak_reason = why
            _warn_weak_once(why)
            probe = self.run({"probe.py": "print('ok')"}, ["probe.py"], limits=SandboxLimits(wall_s=30))
            if probe.stdout.strip() != "ok":
                self.close()
                raise SandboxUnavailable(
                    f"the sandbox cannot run programs here ({why}; a probe program failed: "
                    f"{probe.failure_reason() or scrub(probe.stderr.strip())}). Run as root with CAP_SYS_ADMIN "
                    "(a container started with --cap-add SYS_ADMIN, or a VM) for full isolation, or put the "
                    "interpreter where an unprivileged user can read it.")

    def uid_of(self, slot: int, role: int) -> int:
        """The uid of a job's `role`-th program in `slot` (full isolation, or weak as root)."""
        if role >= _ROLES_PER_SLOT:
            raise ValueError(f"a job has at most {_ROLES_PER_SLOT} roles")
        return self.uid_base + _ROLES_PER_SLOT * slot + role

    def uids(self) -> set[int]:
        return {self.uid_of(s, r) for s in range(self.max_parallel) for r in range(_ROLES_PER_SLOT)}

    def describe(self) -> dict:
        return {"isolation": self.isolation, "memory_limit": self.memory_limit, "weak_reason": self.weak_reason}

    # ------------------------------------------------------------------ run
    def run(self, files: dict[str, str], args: list[str], stdin: str | bytes | None = None,
            limits: SandboxLimits | None = None) -> SandboxResult:
        """One Python program: `files` in a fresh working directory, `python args...` there;
        fd 3 of the program is the report pipe."""
        return self.run_roles([Role("program", files, args, fds={3: "report"}, primary=True)], stdin=stdin,
                              limits=limits)

    def run_roles(self, roles: list[Role], channels: list[str] = (), stdin: str | bytes | None = None,
                  limits: SandboxLimits | None = None) -> SandboxResult:
        """A job of Python programs joined by pipes: channel "c" gives ends "c.r" and "c.w"
        for the roles' `fds`. Ends when the primary role ends."""
        limits = (limits or self.limits).validate()
        slot = self._slots.get()
        try:
            return self._run(slot, roles, list(channels), stdin, limits)
        finally:
            self._slots.put(slot)

    def _interpreter(self) -> tuple[str, dict[str, str], str | None]:
        """(interpreter path as the roles see it, extra environment, prefix to show at _PY_MOUNT)."""
        real = os.path.realpath(self.python or sys.executable)
        prefix = os.path.dirname(os.path.dirname(real)) if self.python else os.path.realpath(sys.base_prefix)
        libs = {"LD_LIBRARY_PATH": os.path.join(prefix, "lib")}
        if self.isolation != "full" or any(prefix == p or prefix.startswith(p + "/") for p in _READONLY):
            return real, libs, None
        rel = os.path.relpath(real, prefix)
        if rel.startswith(".."):
            raise SandboxUnavailable(f"the interpreter {real} lies outside its prefix {prefix}")
        return os.path.join(_PY_MOUNT, rel), {"LD_LIBRARY_PATH": os.path.join(_PY_MOUNT, "lib")}, prefix

    def _fallback_limits(self, lim: SandboxLimits) -> dict:
        """Without a cgroup: processes x address space within the total."""
        procs = max(1, min(lim.nproc, _FALLBACK_PROCESSES))
        return {"nproc": procs, "memory_bytes": min(lim.memory_bytes, lim.memory_total_bytes // procs)}

    def _run(self, slot: int, roles: list[Role], channels: list[str], stdin, limits: SandboxLimits) -> SandboxResult:
        with self._lock:
            self._counter += 1
            run_id = self._counter
        full = self.isolation == "full"
        run_dir = None if full else self._host_dir / f"run-{run_id}"
        interpreter, extra_env, prefix = self._interpreter()
        flags = ["-I", "-B"] + ([] if self.site_packages else ["-S"])
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": _WORKDIR if full else "/nonexistent",
               "TMPDIR": _WORKDIR if full else str(run_dir), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", **extra_env}
        base = {"cpu_s": limits.cpu_s, "memory_bytes": min(limits.memory_bytes, limits.memory_total_bytes),
                "file_bytes": limits.file_bytes, "tmpfs_bytes": min(limits.tmpfs_bytes, limits.memory_total_bytes),
                "nproc": limits.nproc, "nofile": limits.nofile}
        untrusted = dict(base, **({} if self.cgroups.kind else self._fallback_limits(limits)))
        cfg_roles = []
        for k, role in enumerate(roles):
            workdir = _WORKDIR if full else str(run_dir / role.name)
            cfg_roles.append({
                "name": role.name, "files": role.files, "argv": [interpreter] + flags + list(role.args),
                "uid": self.uid_of(slot, k), "workdir": workdir, "primary": role.primary,
                "fds": {**{str(n): src for n, src in role.fds.items()},
                        **({"0": "null"} if role.stdin == "null" else {}),
                        **({"1": "null"} if role.stdout == "null" else {})},
                # the first role is the untrusted one; later roles (tests) run code from the dataset
                "limits": untrusted if k == 0 else base,
            })
        cfg_r, cfg_w = os.pipe()
        rep_r, rep_w = os.pipe()
        cfg = {
            "isolate": full, "roles": cfg_roles, "channels": channels, "host_fds": {"report": rep_w},
            "env": env, "nice": 10, "limits": base, "cgroup_procs": self.cgroups.procs_files(slot),
            "root_dir": str(self._host_dir / "root"),
            "readonly_paths": [p for p in _READONLY if os.path.lexists(p)],
            "python_prefix": prefix, "python_mount": _PY_MOUNT,
        }
        launcher = [sys.executable, "-I", "-S", str(LAUNCHER), str(cfg_r)]
        self.cgroups.limit(slot, limits.memory_total_bytes, limits.nproc + 16)
        oom_before = self.cgroups.oom_kills(slot)
        t0 = time.monotonic()
        try:
            if run_dir is not None:
                run_dir.mkdir()
            proc = subprocess.Popen(
                launcher, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(cfg_r, rep_w), start_new_session=True, env={"PATH": env["PATH"]},
            )
        finally:
            os.close(cfg_r)
            os.close(rep_w)
        with os.fdopen(cfg_w, "wb") as f:
            f.write(marshal.dumps(cfg))
        try:
            out = _collect(proc, rep_r, stdin, limits, t0)
        finally:
            os.close(rep_r)
            if run_dir is not None:
                if os.geteuid() == 0:  # weak isolation: no PID namespace ended what the job left running
                    _kill_uids({self.uid_of(slot, k) for k in range(len(roles))})
                shutil.rmtree(run_dir, ignore_errors=True)
        stdout, stderr, report, timed_out, limited = out
        self.cgroups.wait_empty(slot)
        return SandboxResult(proc.returncode, stdout, stderr, report, timed_out, limited,
                             time.monotonic() - t0, self.isolation,
                             memory_limited=self.cgroups.oom_kills(slot) > oom_before)

    def close(self) -> None:
        self.cgroups.close()
        shutil.rmtree(self._host_dir, ignore_errors=True)
        _live.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_SLOTS_PER_SANDBOX = 256


def _uid_base(instance: int) -> int:
    """Sandbox uids: a block per (process, sandbox), so that neither two sandboxes of one
    process nor the sandboxes of processes side by side (the ranks of a distributed run) share
    a uid, and with it an RLIMIT_NPROC count or a kernel keyring."""
    block = _ROLES_PER_SLOT * _SLOTS_PER_SANDBOX
    return 1_000_000 + ((os.getpid() % 32768) * 8 + instance % 8) * block


_live: "weakref.WeakSet[Sandbox]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for sb in list(_live):
        sb.close()


def _remove_stale() -> None:
    """Leftovers of sandboxes whose process died without closing them (killed runs): their
    host directories and cgroups, found by the process id in their names."""
    for path in Path(tempfile.gettempdir()).glob("posttrain-sandbox-*-*"):
        _remove_if_orphaned(path, lambda p: shutil.rmtree(p, ignore_errors=True))
    for path in SlotCgroups.leftovers("posttrain-sandbox-"):
        _remove_if_orphaned(path, lambda p: p.rmdir())


def _remove_if_orphaned(path: Path, remove) -> None:
    pid = path.name.split("-")[2]
    if pid.isdigit() and not Path(f"/proc/{pid}").exists():
        try:
            remove(path)
        except OSError:
            pass


def _kill_uids(uids: set[int]) -> None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid in uids:
                    os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass


def _kill_group(proc: subprocess.Popen) -> None:
    """The launcher's whole process group (in full isolation, the job's PID namespace dies
    with the launcher's child, which gets the parent-death signal)."""
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
    feeder = None
    if data:  # in a thread: a program that does not read its input must not block the deadline
        def feed():
            try:
                proc.stdin.write(data)
                proc.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
    else:
        proc.stdin.close()
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
    _kill_group(proc)  # anything left in the group (weak isolation has no PID namespace to do this)
    if feeder is not None:
        try:
            proc.stdin.close()
        except OSError:
            pass
    cap = limits.output_bytes
    dec = lambda b: bytes(b[:cap]).decode("utf-8", "replace")  # noqa: E731
    return dec(bufs["out"]), dec(bufs["err"]), bytes(bufs["rep"][:cap]), timed_out, limited
