"""Hostile code against the code reward: every program in tests/hostile_programs.py scores 0
on the task it does not solve, and leaves the host as it was.

After each program the host is checked: no new files in the host's writable places (its
/tmp, /var/tmp, /dev/shm, /root, /etc, /, the checkout and its parent), the canary file
intact, no bytes at the host's TCP, UDP, unix-path and abstract-unix listeners, no host
secret in the reward's reason, no process left under a sandbox uid, and the host's
available memory back where it was.
"""

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from hostile_programs import (ADD_PROMPT, ADD_SOLUTION, ADD_TESTS, HELPER_TESTS, HOSTILE, ITER_TESTS, ZERO_PROMPT,
                              ZERO_SOLUTION, ZERO_TESTS)
from reward import CodeReward, Sandbox, SandboxLimits

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="full isolation (namespaces, uid switch) needs root")

CHECKOUT = Path(__file__).resolve().parents[1]
TASKS = {"add": (ADD_PROMPT, ADD_TESTS, "add"), "zero": (ZERO_PROMPT, ZERO_TESTS, "find_zero"),
         "iter": (ADD_PROMPT, ITER_TESTS, "add"), "helper": (ADD_PROMPT, HELPER_TESTS, "add")}
LIMITS = SandboxLimits(wall_s=4.0, cpu_s=3, memory_bytes=512 << 20, memory_total_bytes=768 << 20)
WATCHED = ["/tmp", "/var/tmp", "/dev/shm", "/root", "/etc", "/", str(CHECKOUT), str(CHECKOUT.parent), "/work"]


@pytest.fixture(scope="module")
def sandbox():
    sb = Sandbox(max_parallel=2)
    assert sb.isolation == "full"
    yield sb
    sb.close()


class _Listeners:
    """Host sockets a program might reach: TCP and UDP on loopback, a unix path, an abstract name."""

    def __init__(self, tmp: Path):
        self.received: list[bytes] = []
        self.tcp = socket.socket()
        self.tcp.bind(("127.0.0.1", 0))
        self.port = self.tcp.getsockname()[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", self.port))
        self.unix_path = str(tmp / "host.sock")
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        self.abstract_name = f"posttrain-host-{os.getpid()}"
        self.abstract = socket.socket(socket.AF_UNIX)
        self.abstract.bind("\0" + self.abstract_name)
        for s in (self.tcp, self.unix, self.abstract):
            s.listen()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._serve, args=(s,), daemon=True)
                        for s in (self.tcp, self.unix, self.abstract, self.udp)]
        for t in self.threads:
            t.start()

    def _serve(self, s):
        s.settimeout(0.1)
        while not self.stop.is_set():
            try:
                if s.type == socket.SOCK_DGRAM:
                    self.received.append(s.recv(100))
                    continue
                conn, _ = s.accept()
            except OSError:
                continue
            conn.settimeout(1)
            try:
                self.received.append(conn.recv(100) or b"<connected>")
            except OSError:
                self.received.append(b"<connected>")
            conn.close()

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join()
        for s in (self.tcp, self.udp, self.unix, self.abstract):
            s.close()


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    canary_dir = tmp_path_factory.mktemp("canary")
    (canary_dir / "canary.txt").write_text("still here")
    secret = "s3cret-" + os.urandom(8).hex()
    os.environ["POSTTRAIN_SECRET_TOKEN"] = secret
    listeners = _Listeners(tmp_path_factory.mktemp("sockets"))
    yield {"canary_dir": canary_dir, "secret": secret, "listeners": listeners}
    listeners.close()
    os.environ.pop("POSTTRAIN_SECRET_TOKEN", None)


def _fill(code: str, host) -> str:
    lis = host["listeners"]
    for key, value in {"@PORT@": lis.port, "@UNIX@": lis.unix_path, "@ABSTRACT@": lis.abstract_name,
                       "@CANARY@": host["canary_dir"], "@CHECKOUT@": CHECKOUT, "@HOSTPID@": os.getpid()}.items():
        code = code.replace(key, str(value))
    return code


def _listing() -> dict[str, set[str]]:
    out = {}
    for d in WATCHED:
        try:
            out[d] = {n for n in os.listdir(d) if not n.startswith("posttrain-sandbox-")}
        except OSError:
            out[d] = set()
    return out


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no MemAvailable")


def _memory_back(before: int, slack: int = 128 << 20, timeout_s: float = 15.0) -> bool:
    """Freed pages reach MemAvailable over a few seconds on some kernels (a plain allocate and
    free in this process shows it too), so wait for it, within a bound. In a VM with free page
    reporting (virtio-balloon) pages freed by the job are handed to the hypervisor before they
    count as available again, and other work on the host moves the figure too: there the check
    allows the job's own limit on top (the cgroup check above is the exact one)."""
    if Path("/sys/module/page_reporting").exists():
        slack += LIMITS.memory_total_bytes
    deadline = time.monotonic() + timeout_s
    while _mem_available() < before - slack:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _cgroup_held(sb: Sandbox) -> int:
    """Anonymous and tmpfs bytes still charged to the sandbox's cgroups (0 without cgroups);
    page cache of files the jobs read is not held by anyone and stays reclaimable."""
    total = 0
    for dirs in sb.cgroups.dirs:
        for d in dirs:
            if (d / "memory.stat").exists():
                stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines())
                total += sum(int(stat.get(k, 0)) for k in ("anon", "shmem", "rss"))
    return total


def _sandbox_processes(sb: Sandbox) -> list[str]:
    uids = {str(u) for u in sb.uids()}
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            uid_line = next((l for l in status.read_text().splitlines() if l.startswith("Uid:")), "")
        except OSError:
            continue
        if uid_line.split()[1:2] and uid_line.split()[1] in uids:
            found.append(status.parent.name)
    return found


def _score(sandbox, task: str, code: str):
    prompt, tests, entry = TASKS[task]
    reward = CodeReward(limits=LIMITS, sandbox=sandbox)
    return reward.score_detailed([prompt], [code], test=[tests], entry_point=[entry])[0]


@pytest.mark.parametrize("task,code", [("add", ADD_SOLUTION), ("zero", ZERO_SOLUTION), ("iter", ADD_SOLUTION),
                                       ("helper", ADD_SOLUTION)])
def test_the_tasks_are_solvable(sandbox, task, code):
    """Positive control: the corpus's zeros mean something only if a real solution scores 1."""
    result = _score(sandbox, task, code)
    assert result.score == 1.0 and result.isolation == "full", result


def test_the_corpus_covers_the_attack_classes():
    assert len(HOSTILE) >= 40
    names = set(HOSTILE)
    for needed in ("frame_walk", "gc_walk", "always_equal_staticmethod", "always_equal_callable_instance",
                   "always_equal_lying_mro", "rebind_builtin_module_level", "patch_modules", "rebind_test_helper",
                   "exit_at_import", "fake_report_every_fd", "signal_everyone", "fork_bomb", "thread_bomb",
                   "memory_bomb_many_processes", "daemon_outlives", "read_host_files", "write_host_files",
                   "tcp_to_host", "unix_socket_to_host", "abstract_socket_to_host", "other_socket_families",
                   "proc_tricks"):
        assert needed in names, needed


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_scores_zero_and_leaves_the_host_alone(name, sandbox, host):
    task, code = HOSTILE[name]
    code = _fill(code, host)
    before, mem_before, cwd = _listing(), _mem_available(), os.getcwd()
    t0 = time.monotonic()
    result = _score(sandbox, task, code)
    elapsed = time.monotonic() - t0

    assert result.score == 0.0, (name, result)
    assert result.isolation == "full"
    assert elapsed < LIMITS.wall_s + 6, f"{name} took {elapsed:.1f}s"
    after = _listing()
    assert {d: after[d] - before[d] for d in WATCHED if after[d] - before[d]} == {}
    assert (host["canary_dir"] / "canary.txt").read_text() == "still here"
    assert sorted(p.name for p in host["canary_dir"].iterdir()) == ["canary.txt"]
    assert host["listeners"].received == []
    text = result.reason + " ".join(result.failures)
    assert host["secret"] not in text and "still here" not in text and "posttrain" not in text.lower()
    assert _sandbox_processes(sandbox) == []
    assert _cgroup_held(sandbox) < 32 << 20, "the job's cgroup still holds memory"
    assert _memory_back(mem_before), "host memory not given back"
    assert os.getcwd() == cwd


def test_the_listeners_would_have_noticed(host):
    """Positive control for the socket checks: a host-side connection is recorded."""
    lis = host["listeners"]
    for family, address in ((socket.AF_INET, ("127.0.0.1", lis.port)), (socket.AF_UNIX, lis.unix_path),
                            (socket.AF_UNIX, "\0" + lis.abstract_name)):
        with socket.socket(family) as s:
            s.connect(address)
            s.sendall(b"hello")
    deadline = time.monotonic() + 5
    while len(lis.received) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(lis.received) == [b"hello"] * 3
    lis.received.clear()


def test_the_sandbox_sees_only_what_the_interpreter_needs(sandbox, host):
    """Positive control for the file checks: the program's own view of the filesystem."""
    code = ("import os\nprint(sorted(os.listdir('/')))\nprint(os.path.exists('@CHECKOUT@'), os.path.exists('@CANARY@'),"
            " os.path.exists('/root'), os.path.exists('/run'), os.path.exists('/home'), os.path.exists('/sys'))\n"
            "print((sorted(os.listdir('/tmp')), sorted(os.listdir('/dev'))))\n")
    run = sandbox.run({"view.py": _fill(code, host)}, ["view.py"])
    assert run.returncode == 0, run.stderr
    top, flags, rest = run.stdout.strip().splitlines()
    assert set(eval(top)) <= {"bin", "dev", "etc", "lib", "lib64", "lib32", "libx32", "proc", "python", "sbin", "tmp", "usr"}
    assert flags == "False False False False False False"
    tmp, dev = eval(rest)
    assert tmp == ["w"] and dev == ["null", "random", "urandom", "zero"]


def test_daemons_die_with_the_job(sandbox):
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n    os._exit(0)\n"
            "print(os.getpid())\n")
    run = sandbox.run({"d.py": code}, ["d.py"])
    assert run.stdout.strip() == "1"  # PID 1 of its own namespace
    assert _sandbox_processes(sandbox) == []
