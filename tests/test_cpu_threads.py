"""The CPU thread governor follows the CPU share the process gets: fewer threads when it gets
clearly less than a core per thread while other tasks wait, one more when it uses every thread
fully, never above the cores it may use (the clocks and the run queue are simulated)."""

import pytest
import torch

from posttrain.train import cpu_threads as ct


@pytest.fixture
def clock(monkeypatch):
    state = {"wall": 0.0, "cpu": 0.0, "running": 1}
    monkeypatch.setattr(ct.time, "perf_counter", lambda: state["wall"])
    monkeypatch.setattr(ct.time, "process_time", lambda: state["cpu"])
    monkeypatch.setattr(ct, "_others_running", lambda: state["running"])
    before = torch.get_num_threads()
    yield state
    torch.set_num_threads(before)


def _window(gov, state, cores_used: float, running: int, ticks: int = 8):
    """One second of compute with a tick every 1/8 s: exactly one decision window."""
    state["running"] = running
    for _ in range(ticks):
        state["wall"] += 0.125
        state["cpu"] += 0.125 * cores_used
        gov.tick()


def test_threads_follow_the_share_of_the_cores(clock):
    gov = ct.CPUThreads(max_threads=4)
    gov.max = 4                   # as if the machine had 4 cores for us
    gov.set(4)
    _window(gov, clock, cores_used=3.9, running=4)       # idle machine, all threads busy: stays
    assert gov.threads == 4
    _window(gov, clock, cores_used=1.3, running=9)       # crowded, a third of our threads' worth
    assert gov.threads == 1 and torch.get_num_threads() == 1
    _window(gov, clock, cores_used=0.7, running=9)       # still crowded: no probing above the share
    assert gov.threads == 1
    _window(gov, clock, cores_used=1.0, running=1)       # the others left: one more each window
    assert gov.threads == 2
    _window(gov, clock, cores_used=2.0, running=2)
    _window(gov, clock, cores_used=3.0, running=3)
    assert gov.threads == 4
    _window(gov, clock, cores_used=4.0, running=4)
    assert gov.threads == 4                              # never above the cores it may use


def test_a_single_threaded_phase_on_an_idle_machine_keeps_the_threads(clock):
    gov = ct.CPUThreads(max_threads=2)
    gov.max = 2
    gov.set(2)
    _window(gov, clock, cores_used=1.0, running=1)       # Python-bound work, nobody else waiting
    assert gov.threads == 2


def test_a_pause_between_ticks_starts_a_new_window(clock):
    """Single-threaded work between compute phases (rewards, tokenising) has no ticks: the
    first tick after it must not read its low CPU use as a crowded machine."""
    gov = ct.CPUThreads(max_threads=4)
    gov.max = 4
    gov.set(4)
    for _ in range(5):
        clock["running"] = 5                     # one other task runnable beside our four threads
        clock["wall"] += 2.0                     # a 2-second single-threaded phase, no ticks
        clock["cpu"] += 2.0
        gov.tick()
        _window(gov, clock, cores_used=3.9, running=5)   # then compute with all threads
        assert gov.threads == 4


def test_compute_with_ticks_far_apart_is_not_a_pause(clock):
    """Micro-batches of 1.5 s each (one tick per micro-batch) on a crowded machine: the gaps
    are compute, so the governor still drops to the share it gets."""
    gov = ct.CPUThreads(max_threads=4)
    gov.max = 4
    gov.set(4)
    clock["running"] = 9
    for _ in range(4):
        clock["wall"] += 1.5
        clock["cpu"] += 1.5 * 1.2
        gov.tick()
    assert gov.threads == 1


def test_a_thread_count_owned_elsewhere_turns_the_governor_off(clock, monkeypatch):
    gov = ct.CPUThreads(max_threads=2)
    gov.max = 2
    monkeypatch.setattr(ct.torch, "set_num_threads", lambda n: None)   # as vLLM-CPU leaves it
    gov.set(1 if torch.get_num_threads() != 1 else 2)
    assert not gov.enabled
    before = gov.threads
    _window(gov, clock, cores_used=0.2, running=9)
    assert gov.threads == before
