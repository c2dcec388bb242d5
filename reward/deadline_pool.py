"""Worker processes that run a function with a hard per-item deadline, callable from any thread.

math-verify bounds its own work with `signal.alarm`, which only works on a process's main
thread and cannot interrupt C code (a huge integer power, a pathological sympy call). Here
every item runs in a separate worker process (on that process's main thread, so the library's
own timeouts still work as a first line); if an item overruns its deadline the worker is
killed and replaced, and the caller gets a timeout outcome. The caller never waits longer
than the deadline once its item has started, from the main thread or any other.

Workers are fresh interpreters started with subprocess (no fork of a parent that may hold
threads or a CUDA context, and, unlike multiprocessing's spawn, no re-import of the caller's
`__main__`, so scripts without a main guard are safe). They talk over two pipes with
multiprocessing's Connection framing and announce readiness only after their imports, so an
item's deadline never pays for a worker's start-up.
"""

from __future__ import annotations

import atexit
import importlib
import os
import queue
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass
class Outcome:
    ok: bool
    value: Any = None
    error: str | None = None
    timed_out: bool = False
    seconds: float = 0.0


def _resolve(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _worker_entry() -> None:
    """Entry point of a worker interpreter: argv = read fd, write fd, fn, warmup, memory bytes."""
    rfd, wfd, fn_path, warmup_path, memory = sys.argv[1:6]
    conn = _Duplex(Connection(int(rfd), writable=False), Connection(int(wfd), readable=False))
    _worker_main(conn, fn_path, warmup_path or None, int(memory) or None)


class _Duplex:
    """Two one-way Connections used as one."""

    def __init__(self, reader: Connection, writer: Connection):
        self.reader, self.writer = reader, writer

    def send(self, obj) -> None:
        self.writer.send(obj)

    def recv(self):
        return self.reader.recv()

    def poll(self, timeout: float) -> bool:
        return self.reader.poll(timeout)

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


def _worker_main(conn, fn_path: str, warmup_path: str | None, memory_bytes: int | None) -> None:
    if memory_bytes:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    fn = _resolve(fn_path)
    if warmup_path:
        _resolve(warmup_path)()
    conn.send(("ready", None))
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", fn(item)))
        except MemoryError:
            conn.send(("error", "MemoryError: the item needed more memory than the worker may use"))
        except BaseException as e:  # report, keep serving
            conn.send(("error", f"{type(e).__name__}: {e}"[:500]))


class _Worker:
    def __init__(self, fn_path, warmup_path, memory_bytes):
        parent_r, child_w = os.pipe()
        child_r, parent_w = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        code = "from reward.deadline_pool import _worker_entry; _worker_entry()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(child_r), str(child_w), fn_path, warmup_path or "", str(memory_bytes or 0)],
            pass_fds=(child_r, child_w), env=env, stdin=subprocess.DEVNULL,
        )
        os.close(child_r)
        os.close(child_w)
        self.conn = _Duplex(Connection(parent_r, writable=False), Connection(parent_w, readable=False))

    def wait_ready(self, timeout: float) -> bool:
        if self.conn.poll(timeout):
            try:
                return self.conn.recv()[0] == "ready"
            except (EOFError, OSError):
                return False
        return False

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        finally:
            self.conn.close()


class DeadlinePool:
    """`fn_path` ("module:function") applied to items in `workers` processes, `deadline_s` each."""

    def __init__(self, fn_path: str, workers: int = 2, deadline_s: float = 5.0, warmup_path: str | None = None,
                 memory_bytes: int | None = 4 * 1024**3, start_timeout_s: float = 120.0):
        self.fn_path, self.warmup_path, self.memory_bytes = fn_path, warmup_path, memory_bytes
        self.deadline_s, self.start_timeout_s = deadline_s, start_timeout_s
        self.n_workers = max(1, workers)
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = ThreadPoolExecutor(self.n_workers, thread_name_prefix="deadline-pool")
        self.replaced = 0
        starting = [self._spawn() for _ in range(self.n_workers)]
        for w in starting:
            self._admit(w)

    def _spawn(self) -> _Worker:
        w = _Worker(self.fn_path, self.warmup_path, self.memory_bytes)
        with self._lock:
            self._all.add(w)
        return w

    def _admit(self, w: _Worker) -> None:
        if w.wait_ready(self.start_timeout_s):
            self._idle.put(w)
        else:
            self._discard(w)
            raise RuntimeError(f"a worker for {self.fn_path} failed to start")

    def _discard(self, w: _Worker) -> None:
        with self._lock:
            self._all.discard(w)
        w.kill()

    def _replace_in_background(self, w: _Worker) -> None:
        self._discard(w)
        self.replaced += 1
        if self._closed:
            return

        def start():
            try:
                self._admit(self._spawn())
            except RuntimeError:
                pass  # the remaining workers keep serving

        threading.Thread(target=start, daemon=True).start()

    def run(self, item: Any, deadline_s: float | None = None) -> Outcome:
        """Run one item; safe to call from any thread."""
        if self._closed:
            raise RuntimeError("pool is closed")
        deadline = self.deadline_s if deadline_s is None else deadline_s
        try:
            w = self._idle.get(timeout=self.start_timeout_s)
        except queue.Empty:
            return Outcome(ok=False, error="no worker available (all failed to start)")
        t0 = time.monotonic()
        try:
            w.conn.send(item)
            if w.conn.poll(deadline):
                kind, value = w.conn.recv()
                self._idle.put(w)
                return Outcome(ok=kind == "ok", value=value if kind == "ok" else None,
                               error=value if kind != "ok" else None, seconds=time.monotonic() - t0)
        except (EOFError, OSError, BrokenPipeError) as e:
            self._replace_in_background(w)
            return Outcome(ok=False, error=f"worker died: {type(e).__name__}", seconds=time.monotonic() - t0)
        self._replace_in_background(w)
        return Outcome(ok=False, error=f"timed out after {deadline:g}s", timed_out=True,
                       seconds=time.monotonic() - t0)

    def map(self, items: list, deadline_s: float | None = None) -> list[Outcome]:
        """All items, in order, `workers` at a time."""
        return list(self._threads.map(lambda it: self.run(it, deadline_s), items))

    def close(self) -> None:
        self._closed = True
        self._threads.shutdown(wait=False)
        with self._lock:
            workers = list(self._all)
            self._all.clear()
        for w in workers:
            w.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2)))


_shared: dict[tuple, DeadlinePool] = {}
_shared_lock = threading.Lock()


def shared_pool(fn_path: str, warmup_path: str | None = None, workers: int | None = None,
                deadline_s: float = 5.0) -> DeadlinePool:
    """One process-wide pool per function, created on first use and closed at exit."""
    key = (fn_path, warmup_path, workers)
    with _shared_lock:
        pool = _shared.get(key)
        if pool is None or pool._closed:
            pool = DeadlinePool(fn_path, workers or default_workers(), deadline_s, warmup_path)
            _shared[key] = pool
        return pool


@atexit.register
def _close_shared() -> None:
    for pool in list(_shared.values()):
        pool.close()
