"""Runs as its own interpreter (`python -I -S sandbox_launcher.py CONFIG_FD`): sets up the
sandbox around one program, then execs it. Imports nothing from the project on purpose.

As root (CI, containers) it isolates fully:
  * new mount, network, PID, IPC and UTS namespaces: no network interfaces but a downed
    loopback; the program is PID 1 of its own PID namespace, so when it exits every process
    it started (daemons, double-forks, setsid escapes) is killed by the kernel;
  * the root filesystem re-mounted read-only; fresh size-limited tmpfs on /tmp, /var/tmp and
    /dev/shm, the program's working directory inside /tmp; a private /proc;
  * a dedicated unprivileged uid/gid per parallel slot (so it can neither signal the host's
    processes nor read their /proc entries), no supplementary groups, no_new_privs, and
    the parent-death signal so it dies if this launcher is killed;
  * rlimits: CPU seconds, address space, file size, process count, open files, no core.
Without root it applies the rlimits only (no uid switch, no namespaces) and says so.
Exit status: the program's, or 128 + signal number if it was killed by a signal.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SETUP_FAILED = 125
REPORT_FD = 3

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _isolate(cfg: dict) -> None:
    """Namespaces and filesystem view; runs as root before the fork."""
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("/", "/", None, MS_BIND | MS_REC)
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
    tmp_size = cfg["limits"]["tmpfs_bytes"]
    for path, size in (("/tmp", tmp_size), ("/var/tmp", 1 << 20), ("/dev/shm", 1 << 20)):
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=1777")
    # The interpreter may live where the slot's uid cannot reach (e.g. under /root):
    # show its installation read-only at a fixed path inside the sandbox.
    target = cfg["python_mount"]
    os.makedirs(target, mode=0o755)
    _mount(cfg["python_prefix"], target, None, MS_BIND | MS_REC)
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)


def _limit(cfg: dict, root: bool) -> None:
    lim = cfg["limits"]
    cpu = int(lim["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (lim["memory_bytes"], lim["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["file_bytes"], lim["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim["nofile"], lim["nofile"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if root:  # per-uid count: only meaningful for the slot's own uid
        resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"], lim["nproc"]))


def _child(cfg: dict, isolated: bool) -> None:
    root = os.geteuid() == 0
    uid, gid = cfg["uid"], cfg["gid"]
    if isolated:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    workdir = cfg["workdir"]
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    for name, content in cfg["files"].items():
        path = os.path.join(workdir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(content)
        if root:
            os.chown(path, uid, gid)
    if root:
        os.chown(workdir, uid, gid)
    os.nice(cfg.get("nice", 10))
    _limit(cfg, root)
    if root:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    # after the uid change: changing credentials clears the parent-death signal
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    os.chdir(workdir)
    report = cfg["report_fd"]
    if report != REPORT_FD:  # the program finds its report pipe at fd 3
        os.dup2(report, REPORT_FD)
        os.close(report)
    os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])


def main() -> None:
    fd = int(sys.argv[1])
    with os.fdopen(fd, "rb") as f:
        cfg = json.loads(f.read())
    isolated = False
    if cfg["isolate"] and os.geteuid() == 0:
        try:
            _isolate(cfg)
            isolated = True
        except OSError as e:
            if cfg.get("require_isolation"):
                print(f"sandbox: isolation failed: {e}", file=sys.stderr)
                os._exit(SETUP_FAILED)
    pid = os.fork()  # the child is PID 1 of the new PID namespace
    if pid == 0:
        try:
            _child(cfg, isolated)
        except BaseException as e:  # setup failed: say why on stderr
            print(f"sandbox: setup failed: {e}", file=sys.stderr)
        os._exit(SETUP_FAILED)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
