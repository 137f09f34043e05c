"""How a benchmark process runs: the load client's event loop, and SIGTERM stopping it with
the same clean-up as Ctrl-C (every process started is stopped)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed, else asyncio's default (None)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def raise_interrupt(_signum: int, _frame: Any) -> None:
    """A SIGTERM handler: raise KeyboardInterrupt where the signal lands (the chat benchmark)."""
    raise KeyboardInterrupt


def cancel_or_interrupt(_signum: int, _frame: Any) -> None:
    """A SIGTERM handler that stops like Ctrl-C: cancel the running phase, or unwind
    synchronous code right here (the streaming benchmark).

    Raising KeyboardInterrupt from the handler while the loop runs (as `raise_interrupt` does)
    is not enough under uvloop: when the signal lands in a transport callback, uvloop reports
    the exception as a fatal transport error and carries on (or the process dies of the
    signal), and the child processes are left running.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise KeyboardInterrupt from None
    for task in asyncio.all_tasks(loop):
        task.cancel()
