"""Hostile code: every kind is contained, scores 0, and leaves the host as it was.

The task is `add(a, b)`; each hostile "solution" attacks instead of (or besides) solving it.
After each run the host is checked: a canary file outside the sandbox, no files planted in
root-owned places, no bytes at a loopback server, no leaked secret, no process left under a
sandbox uid, /tmp not filled, and this process alive and in its own directory.
"""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from reward import CodeReward, Sandbox, SandboxLimits

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="full isolation (namespaces, uid switch) needs root")

TESTS = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-5, 5) == 0\n    assert candidate(10, 7) == 17\n"
WRONG = "def add(a, b):\n    return -999\n"

HOSTILE = {
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "memory_bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(50_000_000))\n",
    "infinite_loop": "def add(a, b):\n    while True:\n        pass\n",
    "busy_thread": "import threading\ndef spin():\n    while True:\n        pass\n"
                   "threading.Thread(target=spin).start()\n" + WRONG,
    "deep_recursion": "import sys\nsys.setrecursionlimit(10**7)\ndef add(a, b):\n    return add(a, b) + 1\n",
    "huge_output": "import sys\nwhile True:\n    sys.stdout.write('x' * 1_000_000)\n",
    "write_outside": "for p in ['/etc/posttrain-pwned', '/root/posttrain-pwned', '{canary_dir}/pwned', '/work/posttrain-pwned']:\n"
                     "    try:\n        open(p, 'w').write('pwned')\n    except OSError:\n        pass\n" + WRONG,
    "delete_files": "import os, shutil\nfor p in ['{canary_dir}/canary.txt']:\n    try:\n        os.remove(p)\n"
                    "    except OSError:\n        pass\nshutil.rmtree('{canary_dir}', ignore_errors=True)\n" + WRONG,
    "read_secrets": "import os\nleak = [os.environ.get('POSTTRAIN_SECRET_TOKEN', '')]\n"
                    "for p in ['/proc/1/environ', '/proc/{host_pid}/environ', '/proc/self/environ']:\n"
                    "    try:\n        leak.append(open(p).read())\n    except OSError:\n        pass\n"
                    "print(leak)\ndef add(a, b):\n    return str(leak)\n",
    "network_socket": "import socket\nfor target in [('127.0.0.1', {port}), ('1.1.1.1', 53)]:\n    try:\n"
                      "        s = socket.create_connection(target, timeout=1)\n        s.sendall(b'pwned')\n"
                      "    except OSError:\n        pass\n" + WRONG,
    "kill_parent": "import os, signal\nfor pid in [os.getppid(), {host_pid}, -1]:\n    try:\n"
                   "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n" + WRONG,
    "exit_before_tests": "import os\nos._exit(0)\n",
    "sys_exit_in_tests": "def add(a, b):\n    import sys\n    sys.exit(0)\n",
    "always_equal_object": "class Always:\n    def __eq__(self, other):\n        return True\n"
                           "    def __ne__(self, other):\n        return False\n"
                           "def add(a, b):\n    return Always()\n",
    "patch_builtins": "import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {{}})\n"
                      "builtins.BaseException = type('Nope2', (Exception,), {{}})\nbuiltins.print = lambda *a, **k: None\n"
                      "builtins.isinstance = lambda *a: True\n" + WRONG,
    "sleep_past_deadline": "import time\ndef add(a, b):\n    time.sleep(1000)\n",
    "daemon_outlives": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                       "        time.sleep(60)\n        open('/tmp/daemon-was-here', 'w').write('x')\n    os._exit(0)\n" + WRONG,
    "fill_tmp": "import os\nfor d in ['/tmp', '/var/tmp', '/dev/shm']:\n    for i in range(1000):\n        try:\n"
                "            with open(f'{{d}}/fill-{{i}}', 'wb') as f:\n                f.write(b'0' * 8_000_000)\n"
                "        except OSError:\n            break\n" + WRONG,
    "change_directory": "import os\nos.chdir('/')\ntry:\n    open('pwned-in-root', 'w').write('x')\nexcept OSError:\n    pass\n" + WRONG,
    "ctypes_segfault": "import ctypes\nctypes.string_at(0)\n",
    "fake_success_line": "import os\nprint('All tests passed')\nprint('{{\"passed\": 3, \"total\": 3}}')\n"
                         "for i in range(3):\n    os.write(3, f'0123456789abcdef pass {{i}}\\n'.encode())\n"
                         "os.write(3, b'done\\n')\n" + WRONG,
    "steal_harness_state": "import __main__, os\nleaked = [k for k in dir(__main__) if not k.startswith('__')]\n"
                           "def add(a, b):\n    import sys\n    f = sys._getframe(1)\n    while f is not None:\n"
                           "        send = f.f_locals.get('send')\n        if callable(send) and f.f_code.co_name == '_harness':\n"
                           "            pass\n        f = f.f_back\n    return None\n",
}


@pytest.fixture(scope="module")
def sandbox():
    sb = Sandbox(max_parallel=2)
    assert sb.isolation == "full"
    yield sb
    sb.close()


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    canary_dir = tmp_path_factory.mktemp("canary")
    (canary_dir / "canary.txt").write_text("still here")
    secret = "s3cret-" + os.urandom(8).hex()
    os.environ["POSTTRAIN_SECRET_TOKEN"] = secret
    received = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.settimeout(1)
            try:
                received.append(conn.recv(100))
            except OSError:
                pass
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield {"canary_dir": canary_dir, "secret": secret, "received": received, "port": server.getsockname()[1]}
    stop.set()
    thread.join()
    server.close()
    os.environ.pop("POSTTRAIN_SECRET_TOKEN", None)


def _sandbox_processes(sb: Sandbox) -> list[str]:
    uids = {str(sb.uid_base + k) for k in range(sb.max_parallel)}
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        uid_line = next((l for l in text.splitlines() if l.startswith("Uid:")), "")
        if uid_line.split()[1:2] and uid_line.split()[1] in uids:
            found.append(status.parent.name)
    return found


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_code_is_contained_and_scores_zero(kind, sandbox, host):
    assert len(HOSTILE) >= 20
    code = HOSTILE[kind].format(canary_dir=host["canary_dir"], port=host["port"], host_pid=os.getpid())
    cwd = os.getcwd()
    tmp_free = shutil.disk_usage("/tmp").free
    reward = CodeReward(limits=SandboxLimits(wall_s=4.0, cpu_s=3, memory_bytes=512 << 20), sandbox=sandbox)
    t0 = time.monotonic()
    result = reward.score_detailed([None], [code], test=[TESTS], entry_point=["add"])[0]
    elapsed = time.monotonic() - t0

    assert result.score == 0.0, (kind, result)
    assert elapsed < 10, f"{kind} took {elapsed:.1f}s"
    # the host is unharmed
    assert (host["canary_dir"] / "canary.txt").read_text() == "still here"
    for planted in ("/etc/posttrain-pwned", "/root/posttrain-pwned", "/work/posttrain-pwned", "/pwned-in-root",
                    str(host["canary_dir"] / "pwned"), "/tmp/daemon-was-here"):
        assert not os.path.exists(planted), planted
    assert host["received"] == []
    assert host["secret"] not in result.reason + " ".join(result.failures)
    assert _sandbox_processes(sandbox) == []
    assert shutil.disk_usage("/tmp").free > tmp_free - (50 << 20)
    assert os.getcwd() == cwd


def test_secret_never_reaches_the_program(sandbox, host):
    """Positive control for read_secrets: the program's own output shows what it could read."""
    code = HOSTILE["read_secrets"].format(host_pid=os.getpid())
    run = sandbox.run({"solution.py": code + "print(add(1, 2))\n"}, ["solution.py"])
    assert run.returncode == 0, run.stderr
    assert host["secret"] not in run.stdout and "POSTTRAIN" not in run.stdout


def test_daemons_die_with_the_program(sandbox):
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n    os._exit(0)\n"
            "print(os.getpid())\n")
    run = sandbox.run({"d.py": code}, ["d.py"])
    assert run.stdout.strip() == "1"  # PID 1 of its own namespace
    time.sleep(0.2)
    assert _sandbox_processes(sandbox) == []
