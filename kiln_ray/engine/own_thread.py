"""Torch work away from the engine's step thread, on a thread that ends with it.

torch's OpenMP runtime on CPU (libgomp) keeps a pool of worker threads for every thread that
has run a parallel region, for as long as that thread lives. Once the pooled threads outnumber
the cores, libgomp stops spinning between parallel regions ("throttled" waiting): each of the
step thread's few hundred parallel regions per step then waits for its workers to be woken
from a futex. Measured on this project's 2-core machine: a 32-stream decode step took 45-50 ms
when the model had been loaded on the stepping thread or on one that had ended, 62-78 ms when
it had been loaded on another thread still alive (a Serve replica's event loop). In the
replica the step thread switched out ~5700 times a second before the fix, ~450 after.

So in the engine's process the step thread is the only long-lived thread that runs torch
compute. What must run elsewhere (loading the model, a hot swap's copy, building adapter
weights) runs on a fresh thread through `in_own_thread`; the thread's pool goes when it ends.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_own_thread(fn: Callable[..., T], *args) -> asyncio.Future[T]:
    """fn(*args) on a new daemon thread, as a future of the running event loop (like
    `loop.run_in_executor`: shield it to let the work finish past a cancelled caller)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        try:
            loop.call_soon_threadsafe(settle, done, *_outcome(fn, args))
        except RuntimeError:  # the caller's loop has closed: nobody waits any more
            pass

    threading.Thread(target=target, name=_name(fn), daemon=True).start()
    return done


def settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    """Resolve `future` with a result or an error, unless its waiter gave up (on its loop)."""
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def run_in_own_thread(fn: Callable[..., T], *args) -> T:
    """fn(*args) on a new thread, waited for (the synchronous form, for scripts and tests)."""
    box: list = []
    thread = threading.Thread(target=lambda: box.append(_outcome(fn, args)), name=_name(fn), daemon=True)
    thread.start()
    thread.join()
    result, error = box[0]
    if error is not None:
        raise error
    return result


def _outcome(fn: Callable, args: tuple) -> tuple:
    """(result, None) or (None, the exception fn(*args) raised)."""
    try:
        return fn(*args), None
    except BaseException as exc:  # noqa: BLE001 - handed to the caller
        return None, exc


def _name(fn: Callable) -> str:
    return f"kiln-{getattr(fn, '__name__', 'work')}"
