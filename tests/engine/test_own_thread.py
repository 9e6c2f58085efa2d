"""kiln_ray/engine/own_thread.py: torch work on a thread that ends with it leaves no OpenMP
pool behind (the reason it exists), and results and errors reach the caller."""

import asyncio
import subprocess
import sys
import threading

import pytest

from kiln_ray.engine.own_thread import in_own_thread, run_in_own_thread

# A subprocess: the test process's own threads (Ray's, pytest's) come and go.
POOL_PROBE = r"""
import os, sys, threading, time, torch
from kiln_ray.engine.own_thread import run_in_own_thread
torch.set_num_threads(2)
def count():
    return len(os.listdir("/proc/self/task"))
def parallel_work():
    x = torch.randn(1 << 22)
    return float((x * 2).sum())  # large enough for ATen to run it on every thread
base = count()
run_in_own_thread(parallel_work)
deadline = time.monotonic() + 10  # the ended thread's pool winds down just after it
while count() > base and time.monotonic() < deadline:
    time.sleep(0.01)
after_own = count()
done = threading.Event(); release = threading.Event()
def long_lived():
    parallel_work(); done.set(); release.wait()
t = threading.Thread(target=long_lived); t.start(); done.wait()
during_long = count() - 1  # minus that thread itself
release.set(); t.join()
print(base, after_own, during_long)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_parallel_torch_work_on_an_own_thread_leaves_no_pooled_thread_behind():
    out = subprocess.run([sys.executable, "-c", POOL_PROBE], capture_output=True, text=True, timeout=120, check=True)
    base, after_own, during_long = map(int, out.stdout.split())
    # The probe itself: a live thread that ran the same work keeps a pooled worker.
    assert during_long > base, "torch did not parallelise the probe's work: the test shows nothing"
    assert after_own == base


def test_in_own_thread_hands_back_the_result_and_runs_elsewhere():
    async def main():
        name = await in_own_thread(lambda: threading.current_thread().name)
        assert name != threading.current_thread().name
        return await in_own_thread(sum, [1, 2, 3])

    assert asyncio.run(main()) == 6


def test_in_own_thread_raises_the_error_in_the_caller():
    def boom():
        raise KeyError("x")

    async def main():
        await in_own_thread(boom)

    with pytest.raises(KeyError):
        asyncio.run(main())
    with pytest.raises(KeyError):
        run_in_own_thread(boom)


def test_work_finishing_after_its_caller_gave_up_raises_nothing():
    """A cancelled future is left alone when the work ends (no InvalidStateError in a loop
    callback, which asyncio would only log)."""
    started, release = threading.Event(), threading.Event()

    def slow():
        started.set()
        release.wait(5)
        return 1

    async def main():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda _, context: errors.append(context))
        future = in_own_thread(slow)
        await asyncio.to_thread(started.wait, 5)
        worker = next(t for t in threading.enumerate() if t.name == "kiln-slow")
        future.cancel()
        release.set()
        await asyncio.to_thread(worker.join, 5)
        for _ in range(3):
            await asyncio.sleep(0)  # the settle callback runs on this loop
        return future.cancelled(), errors

    cancelled, errors = asyncio.run(main())
    assert cancelled and errors == []
