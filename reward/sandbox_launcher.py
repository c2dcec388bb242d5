"""Runs as its own interpreter (`python -I -S sandbox_launcher.py CONFIG_FD`; the config comes
on that fd, marshalled, from the same interpreter's reward/sandbox.py): builds the
sandbox around one job's processes ("roles"), runs them, and exits with the primary role's
status. Imports nothing from the project on purpose; the host side is reward/sandbox.py.

A job has one or two roles. For a code test, `solution` runs the untrusted program and
`tests` runs the tests, which call into the solution over two pipes; the verdict leaves the
sandbox on the tests' report pipe, which the solution never holds.

Full isolation (as root):
  * the launcher joins the job's cgroup first (one memory and process limit for all of it);
  * new mount, network, PID, IPC and UTS namespaces: no interfaces but a downed loopback, so
    no TCP/UDP and no abstract unix socket of the host is reachable;
  * a new root: a small read-only tmpfs holding read-only binds of what the interpreter
    needs (/usr, /lib*, /bin, /sbin, the interpreter's installation at a fixed path, four
    device nodes) and nothing else: no /home, /root, /run, /sys, host /tmp, or the
    directory the host runs in. The old root is detached;
  * each role gets its own PID namespace (it is PID 1 there: everything it starts dies with
    it), its own mount namespace with a fresh size-limited /tmp holding its working
    directory, its own unprivileged uid, no supplementary groups, no_new_privs, the
    parent-death signal, rlimits, and a seccomp filter: sockets only of the unix, inet and
    inet6 families (all three confined by the namespaces), no io_uring, no new user
    namespaces;
  * the launcher's child is PID 1 of the job's namespace: when the primary role ends, it
    exits and the kernel kills whatever is left.
Without root (or without the right to make namespaces) only the rlimits, the uid switch
(root only) and the seccomp filter apply: "weak" isolation, which the host refuses to use
as a reward unless told otherwise.
Exit status: the primary role's, or 128 + signal number if it was killed by a signal;
SETUP_FAILED with a line on stderr if the sandbox could not be built.
"""

import ctypes
import fcntl
import marshal
import os
import resource
import signal
import struct
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER = 1, 38, 22, 36
SECCOMP_MODE_FILTER = 2
SETUP_FAILED = 125
DEVICES = ("null", "zero", "random", "urandom")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _bind_readonly(source: str, target: str, extra: int = 0) -> None:
    _mount(source, target, None, MS_BIND | MS_REC)
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | extra)


# ------------------------------------------------------------------ seccomp
_ARCH = {"x86_64": (0xC000003E, {"socket": 41, "unshare": 272, "clone": 56, "keys": (248, 249, 250)}),
         "aarch64": (0xC00000B7, {"socket": 198, "unshare": 97, "clone": 220, "keys": (217, 218, 219)})}
_IO_URING = (425, 426, 427)      # io_uring_setup / enter / register: one number on every arch
_CLONE3 = 435
_ALLOWED_FAMILIES = (1, 2, 10)   # AF_UNIX, AF_INET, AF_INET6: the namespaces confine these


def _seccomp_filter() -> bytes | None:
    """A BPF program: kill other ABIs; sockets of the allowed families only; no io_uring (its
    socket op bypasses this filter); no new user namespaces (clone3 answers ENOSYS so the C
    library falls back to clone, whose flags can be read); no kernel keyrings (add_key,
    request_key, keyctl: a store per uid that would outlive the job)."""
    arch = _ARCH.get(os.uname().machine)
    if arch is None:
        return None
    audit_arch, nr = arch
    ALLOW, KILL = 0x7FFF0000, 0x80000000
    errno = lambda e: 0x00050000 | e  # noqa: E731
    prog: list = []  # (code, jt, jf, k) with jt/jf as label names or 0

    def op(code, k, jt=0, jf=0):
        prog.append([code, jt, jf, k])

    LD_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    op(LD_ABS, 4)                                   # arch
    op(JEQ, audit_arch, 0, "kill")
    op(LD_ABS, 0)                                   # syscall number
    op(JGE, 0x40000000, "eperm", 0)                 # x32 numbers on x86_64
    op(JEQ, nr["socket"], "socket", 0)
    op(JEQ, nr["unshare"], "flags", 0)
    op(JEQ, nr["clone"], "flags", 0)
    op(JEQ, _CLONE3, "enosys", 0)
    for n in _IO_URING + nr["keys"]:
        op(JEQ, n, "eperm", 0)
    op(RET, ALLOW)
    labels = {"socket": len(prog)}
    op(LD_ABS, 16)                                  # args[0], low half
    for fam in _ALLOWED_FAMILIES:
        op(JEQ, fam, "allow", 0)
    op(RET, errno(97))                              # EAFNOSUPPORT
    labels["flags"] = len(prog)
    op(LD_ABS, 16)
    op(JSET, CLONE_NEWUSER, "eperm", 0)
    labels["allow"] = len(prog)
    op(RET, ALLOW)
    labels["eperm"] = len(prog)
    op(RET, errno(1))
    labels["enosys"] = len(prog)
    op(RET, errno(38))
    labels["kill"] = len(prog)
    op(RET, KILL)
    out = b""
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        out += struct.pack("HBBI", code, jt, jf, k)
    return out


def _install_seccomp() -> bool:
    program = _seccomp_filter()
    if program is None:
        return False
    buf = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program) // 8, ctypes.addressof(buf))
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp")
    return True


# ---------------------------------------------------------------- the view
def _new_root(cfg: dict) -> None:
    """Pivot into a root that holds only what the interpreter needs (read-only)."""
    root = cfg["root_dir"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for path in cfg["readonly_paths"]:
        target = root + path
        if os.path.islink(path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(path), target)
        elif os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
            _bind_readonly(path, target, MS_NODEV)
        elif os.path.isfile(path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "w").close()
            _bind_readonly(path, target, MS_NODEV)
    if cfg.get("python_prefix"):
        target = root + cfg["python_mount"]
        os.makedirs(target, exist_ok=True)
        _bind_readonly(cfg["python_prefix"], target, MS_NODEV)
    os.makedirs(root + "/dev")
    for name in DEVICES:
        open(f"{root}/dev/{name}", "w").close()
        _mount(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
        _mount(None, f"{root}/dev/{name}", None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NOEXEC)
    for d in ("proc", "tmp", ".old"):
        os.makedirs(f"{root}/{d}")
    _check(_libc.syscall(_PIVOT_ROOT, root.encode(), f"{root}/.old".encode()), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.old", MNT_DETACH), "umount old root")
    os.rmdir("/.old")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine, 155)


# ------------------------------------------------------------------- roles
def _limit(lim: dict, root: bool) -> None:
    cpu = int(lim["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (lim["memory_bytes"], lim["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["file_bytes"], lim["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim["nofile"], lim["nofile"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if root:  # counted per uid: only meaningful for the role's own uid
        resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"], lim["nproc"]))


def _place_fds(mapping: dict[int, int]) -> None:
    """Make fd `target` a copy of fd `source` for each pair (-1: /dev/null); close every other fd."""
    moved = {}
    for target, source in mapping.items():  # first above every target, so no dup2 overwrites a source
        if source < 0:
            null = os.open("/dev/null", os.O_RDWR)
            moved[target] = fcntl.fcntl(null, fcntl.F_DUPFD, 256)
            os.close(null)
        else:
            moved[target] = fcntl.fcntl(source, fcntl.F_DUPFD, 256)
    for target, fd in moved.items():
        os.dup2(fd, target, inheritable=True)
    last = 2
    for fd in sorted(set(mapping) | {0, 1, 2}):
        if fd > last + 1:
            os.closerange(last + 1, fd)
        last = max(last, fd)
    os.closerange(last + 1, max(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 4096))


def _run_role(cfg: dict, role: dict, fds: dict[int, int], isolated: bool) -> None:
    """In the forked child: (own PID and mount namespaces) -> files -> fds -> limits -> exec."""
    root = os.geteuid() == 0
    if isolated:
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC), "unshare role")
        pid = os.fork()  # the role's program is PID 1 of its own namespace
        if pid:
            os.closerange(3, 1 << 20)  # hold no pipe end: the peers must see EOF when the program ends
            os._exit(_wait_status(pid))
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['limits']['tmpfs_bytes']},mode=1777")
    else:
        os.setpgid(0, 0)  # weak isolation: the group is how the launcher finds what it started
    uid = role["uid"]
    workdir = role["workdir"]
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    for name, content in role["files"].items():
        path = os.path.join(workdir, name)
        with open(path, "wb") as f:
            f.write(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        if root:
            os.chown(path, uid, uid)
    if root:
        os.chown(workdir, uid, uid)
    _place_fds(fds)
    os.nice(cfg.get("nice", 10))
    _limit(role.get("limits") or cfg["limits"], root)
    if root:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    # after the uid change: changing credentials clears the parent-death signal
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _install_seccomp()
    os.chdir(workdir)
    os.execve(role["argv"][0], role["argv"], cfg["env"])


def _wait_status(pid: int) -> int:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _fd_sources(spec: dict, channels: dict, host: dict) -> dict[int, int]:
    """The role's fd plan: target number -> an fd of this process ("null" gives /dev/null)."""
    out = {}
    for target, source in spec.items():
        if source == "null":
            out[int(target)] = -1
        elif source in host:
            out[int(target)] = host[source]
        else:
            name, end = source.split(".")
            out[int(target)] = channels[name][0 if end == "r" else 1]
    return out


def _supervise(cfg: dict, isolated: bool) -> int:
    """Start the roles, wait for the primary one, return its status."""
    channels = {name: os.pipe() for name in cfg.get("channels", [])}
    host = {k: int(v) for k, v in cfg.get("host_fds", {}).items()}
    host.update(stdin=0, stdout=1, stderr=2)
    pids = {}
    for role in cfg["roles"]:
        fds = _fd_sources({"0": "stdin", "1": "stdout", "2": "stderr", **role["fds"]}, channels, host)
        pid = os.fork()
        if pid == 0:
            try:
                _run_role(cfg, role, fds, isolated)
            except BaseException as e:  # setup failed: say why on stderr
                os.write(2, f"sandbox: setup of {role['name']} failed: {e}\n".encode())
            os._exit(SETUP_FAILED)
        pids[pid] = role
    for r, w in channels.values():
        os.close(r)
        os.close(w)
    primary = next(pid for pid, role in pids.items() if role.get("primary"))
    status = _wait_status(primary)
    if isolated:  # PID 1 of the job: end everything in it and reap it, so nothing outlives the job
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        while True:
            try:
                os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
    else:  # no PID namespace to end the rest: kill what the roles left behind
        _kill_leftovers(pids, {role["uid"] for role in cfg["roles"]} if os.geteuid() == 0 else set())
    return status


def _kill_leftovers(pids: dict, uids: set[int]) -> None:
    """Weak isolation only: kill each role's process group and (as root) every process of the
    roles' own uids; then, as their subreaper, kill and reap every child this process is left
    with (orphans land here) until there is none."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    me = str(os.getpid())
    while True:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = f.read().rsplit(")", 1)[1].split()[1]
                if parent == me or os.stat(f"/proc/{entry}").st_uid in uids:
                    os.kill(int(entry), signal.SIGKILL)
            except (OSError, IndexError):
                pass
        try:
            os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue


def _join_cgroups(paths: list[str]) -> None:
    for path in paths:
        with open(path, "w") as f:
            f.write(str(os.getpid()))


def main() -> None:
    fd = int(sys.argv[1])
    with os.fdopen(fd, "rb") as f:
        cfg = marshal.loads(f.read())
    try:
        _join_cgroups(cfg.get("cgroup_procs", []))
    except OSError as e:
        os.write(2, f"sandbox: could not join the job's cgroup: {e}\n".encode())
        os._exit(SETUP_FAILED)
    if not cfg["isolate"]:
        # what the roles orphan is re-parented here, not to the host's init, so it is reaped
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        os._exit(_supervise(cfg, False))
    try:
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    except OSError as e:
        os.write(2, f"sandbox: isolation failed: {e}\n".encode())
        os._exit(SETUP_FAILED)
    pid = os.fork()  # PID 1 of the job's namespace: when it returns, everything in it dies
    if pid == 0:
        try:
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            _new_root(cfg)
            status = _supervise(cfg, True)
        except BaseException as e:
            os.write(2, f"sandbox: isolation failed: {e}\n".encode())
            status = SETUP_FAILED
        os._exit(status)
    os._exit(_wait_status(pid))


if __name__ == "__main__":
    main()
