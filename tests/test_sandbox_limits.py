"""The sandbox's limits as a whole: one memory limit for the whole job, the socket families a
program may open, the isolation it reports, and its refusal to judge code when isolation is
weak."""

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from reward import CodeReward, Sandbox, SandboxLimits
from reward.sandbox import SandboxUnavailable, scrub

ROOT = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="full isolation (namespaces, uid switch) needs root")

# N processes each touching M MiB at the same time: N x M is far above the job's total
N_PROCS, MIB_EACH, TOTAL_MIB = 6, 200, 384
MEMORY_HOG = f"""
import os, time
kids = []
for i in range({N_PROCS}):
    pid = os.fork()
    if pid == 0:
        try:
            b = bytearray({MIB_EACH} << 20)
            for j in range(0, len(b), 4096):
                b[j] = 1
            os.write(1, b"held\\n")
            time.sleep(2)
        except MemoryError:
            os._exit(3)
        os._exit(0)
    kids.append(pid)
print([os.waitpid(p, 0)[1] for p in kids])
"""


def _job_memory(uids: set[int]) -> int:
    """Resident anonymous + shared-memory bytes of every process running under `uids`."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1 ").split()[0]) in uids:
            total += sum(int(fields.get(k, "0 kB").split()[0]) << 10 for k in ("RssAnon", "RssShmem"))
    return total


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no MemAvailable")


def _page_reporting_backlog() -> int:
    """Freed memory a VM's free page reporting may hold out of MemAvailable for a while
    (virtio-balloon page reporting; 0 elsewhere). A plain allocate-and-free in one process
    shows the same delay, so the host check allows for it and says so."""
    path = Path("/sys/module/page_reporting/parameters/max_waiting_mib")
    return int(path.read_text()) << 20 if path.exists() else 0


@needs_root
@pytest.mark.parametrize("cgroup", [True, False], ids=["cgroup", "rlimit-bound"])
def test_whole_job_memory_limit(cgroup):
    sb = Sandbox(max_parallel=1, memory_cgroup=cgroup)
    try:
        assert sb.isolation == "full"
        if cgroup and sb.cgroups.kind is None:
            pytest.skip("no writable memory cgroup here (the rlimit-bound case covers the fallback)")
        assert sb.memory_limit == (f"cgroup-{sb.cgroups.kind}" if cgroup else "rlimit-bound")
        samples = {"job": 0, "host_low": _mem_available()}
        base = samples["host_low"]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                samples["job"] = max(samples["job"], _job_memory(sb.uids()))
                samples["host_low"] = min(samples["host_low"], _mem_available())
                time.sleep(0.002)

        watcher = threading.Thread(target=sample)
        watcher.start()
        limits = SandboxLimits(wall_s=30, cpu_s=20, memory_bytes=1 << 30, memory_total_bytes=TOTAL_MIB << 20)
        try:
            run = sb.run({"hog.py": MEMORY_HOG}, ["hog.py"], limits=limits)
        finally:
            stop.set()
            watcher.join()
        assert run.returncode == 0, (run.stdout, run.stderr)
        statuses = eval(run.stdout.strip().splitlines()[-1])
        # the processes over the total were killed (cgroup) or refused their memory (rlimit bound)
        assert sum(s == 0 for s in statuses) <= TOTAL_MIB // MIB_EACH, statuses
        assert all(s in (0, 9, 3 << 8) for s in statuses), statuses
        assert samples["job"] <= (TOTAL_MIB + 16) << 20, f"the job held {samples['job'] >> 20} MiB"
        drop = base - samples["host_low"]
        assert drop <= ((TOTAL_MIB + 64) << 20) + _page_reporting_backlog(), f"host memory dropped {drop >> 20} MiB"
    finally:
        sb.close()


@needs_root
def test_socket_families_and_namespaces():
    """Only unix/inet/inet6 sockets can be made (the namespaces confine those); vsock, netlink,
    packet and the rest are refused by the seccomp filter; no new user namespaces."""
    code = textwrap.dedent("""
        import ctypes, socket
        made = []
        for family in (1, 2, 10, 16, 17, 40, 38, 31, 30, 21):
            try:
                socket.socket(family, socket.SOCK_DGRAM if family in (16, 17) else socket.SOCK_STREAM).close()
                made.append(family)
            except OSError as e:
                pass
        libc = ctypes.CDLL(None, use_errno=True)
        interfaces = sorted(line.split(":")[0].strip() for line in open("/proc/net/dev").read().splitlines()[2:])
        print(made, libc.unshare(0x10000000), ctypes.get_errno(), interfaces, sep="|")
    """)
    with Sandbox(max_parallel=1) as sb:
        run = sb.run({"s.py": code}, ["s.py"])
    assert run.returncode == 0, run.stderr
    made, rc, errno, interfaces = run.stdout.strip().split("|")
    assert eval(made) == [1, 2, 10] and rc == "-1" and errno == "1"
    assert eval(interfaces) == ["lo"]


def test_limits_are_validated():
    for bad in (dict(wall_s=0), dict(memory_total_bytes=-1), dict(nproc=float("nan")), dict(cpu_s="10")):
        with pytest.raises(ValueError, match="sandbox limit"):
            SandboxLimits(**bad).validate()


def test_scrub_keeps_one_short_printable_line():
    assert scrub("a\nb\x1b[31mc\u202e" + "x" * 1000) == "a b?[31mc?" + "x" * 290


@needs_root
def test_results_carry_the_isolation_level():
    with Sandbox(max_parallel=1) as sb:
        reward = CodeReward(sandbox=sb)
        [res] = reward.score_detailed([None], ["def f():\n    return 1\n"], test=["def check(c):\n    assert c() == 1\n"],
                                      entry_point=["f"])
        assert (res.score, res.isolation) == (1.0, "full")
        [res] = reward.score_detailed([None], ["print(input())"], inputs=[["7\n"]], outputs=[["7"]])
        assert (res.score, res.isolation) == (1.0, "full")


def _without_sys_admin() -> list[str] | None:
    if os.geteuid() != 0:
        return None
    if shutil.which("capsh"):
        return ["capsh", "--drop=cap_sys_admin", "--", "-c", 'exec "$0" "$@"']
    if shutil.which("setpriv"):
        return ["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin"]
    return None


WEAK_PROBE = """
import json, sys
from reward import CodeReward
from reward.sandbox import SandboxUnavailable
out = {}
for allow in (False, True):
    try:
        r = CodeReward(allow_weak_isolation=allow)
        [res] = r.score_detailed([None], ["def f():\\n    return 1\\n"], test=["def check(c):\\n    assert c() == 1\\n"],
                                 entry_point=["f"])
        out[str(allow)] = ["scored", res.score, res.isolation]
    except SandboxUnavailable as e:
        out[str(allow)] = ["refused", str(e)]
print(json.dumps(out))
"""


@pytest.mark.skipif(_without_sys_admin() is None, reason="needs root and capsh or setpriv to drop CAP_SYS_ADMIN")
def test_root_without_cap_sys_admin_refuses_loudly_instead_of_scoring_zero():
    """A container's default: root without CAP_SYS_ADMIN cannot make namespaces. The reward
    must say so and refuse, not fall back silently and score correct programs 0."""
    cmd = _without_sys_admin() + [sys.executable, "-c", WEAK_PROBE]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert "WEAK ISOLATION" in proc.stderr and proc.stderr.count("WEAK ISOLATION") == 1
    # not allowed: refused, either for the weak isolation or because nothing can run at all
    assert out["False"][0] == "refused"
    assert "allow_weak_isolation" in out["False"][1] or "cannot run programs here" in out["False"][1]
    # allowed: either it really runs programs (and says "weak"), or it explains why it cannot
    if out["True"][0] == "scored":
        assert out["True"][1:] == [1.0, "weak"]
    else:
        assert "cannot run programs here" in out["True"][1]


def test_without_root_the_sandbox_is_weak_and_the_reward_refuses(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    try:
        sb = Sandbox(max_parallel=1)
    except SandboxUnavailable as e:  # the interpreter is out of an unprivileged user's reach here
        assert "cannot run programs here" in str(e)
        return
    try:
        assert sb.isolation == "weak"
        with pytest.raises(SandboxUnavailable, match="allow_weak_isolation"):
            CodeReward(sandbox=sb)([None], ["x = 1"], test=["def check(c):\n    pass\n"], entry_point=["f"])
    finally:
        sb.close()


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def public_python():
    """This interpreter and its standard library where any uid can read them (hard links when
    the filesystem allows), so a weakly isolated sandbox can run programs under its own uids."""
    import tempfile

    prefix, exe = Path(os.path.realpath(sys.base_prefix)), Path(os.path.realpath(sys.executable))
    if not str(exe).startswith(str(prefix) + "/"):
        pytest.skip(f"the interpreter {exe} lies outside its prefix {prefix}")
    dst = Path(tempfile.mkdtemp(prefix="pt-public-python-"))
    skip = shutil.ignore_patterns("site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip",
                                  "lib2to3", "config-*", "__pycache__", "*.a", "pkgconfig")
    (dst / "bin").mkdir()
    _link_or_copy(exe, dst / "bin" / exe.name)
    shutil.copytree(prefix / "lib", dst / "lib", ignore=skip, copy_function=_link_or_copy)
    for d in [dst, *dst.rglob("*")]:
        if d.is_dir():
            d.chmod(0o755)
    yield str(dst / "bin" / exe.name)
    shutil.rmtree(dst, ignore_errors=True)


@needs_root
def test_weak_isolation_when_allowed_still_judges_right(public_python):
    """With namespaces off (as without CAP_SYS_ADMIN) but allowed, the reward still judges:
    right 1, wrong 0, always-equal 0, the result says "weak", and nothing outlives the job."""
    with Sandbox(max_parallel=2, isolate=False, python=public_python) as sb:
        assert sb.isolation == "weak" and sb.weak_reason == "isolation turned off"
        reward = CodeReward(sandbox=sb, allow_weak_isolation=True)
        tests = "def check(c):\n    assert c(2) == 4\n    assert c(3) == 9\n"
        daemon = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n    os._exit(0)\n"
                  "def sq(x):\n    return -1\n")
        always = "class A:\n    def __eq__(self, o):\n        return True\ndef sq(x):\n    return A()\n"
        results = reward.score_detailed([None] * 4, ["def sq(x):\n    return x * x\n", "def sq(x):\n    return x\n",
                                                     always, daemon],
                                        test=[tests] * 4, entry_point=["sq"] * 4)
        assert [r.score for r in results] == [1.0, 0.0, 0.0, 0.0], results
        assert {r.isolation for r in results} == {"weak"}
        time.sleep(0.2)
        assert not [p for p in Path("/proc").glob("[0-9]*") if p.stat().st_uid in sb.uids()]


@needs_root
def test_no_kernel_keyring_to_outlive_the_job():
    from reward.sandbox_launcher import _ARCH

    if os.uname().machine not in _ARCH:
        pytest.skip(f"no seccomp table for {os.uname().machine}")
    add_key = _ARCH[os.uname().machine][1]["keys"][0]
    code = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"print(libc.syscall({add_key}, b'user', b'posttrain-probe', b'x', 1, -4), ctypes.get_errno())\n")
    with Sandbox(max_parallel=1) as sb:
        run = sb.run({"k.py": code}, ["k.py"])
    assert run.stdout.split() == ["-1", "1"], (run.stdout, run.stderr)  # EPERM from the filter
