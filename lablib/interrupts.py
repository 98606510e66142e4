"""SIGTERM handled like Ctrl-C, so a stopped command unwinds instead of vanishing.

Python's default SIGTERM ends the process at once: no `finally`, no cleanup, and child
processes in other process groups (a papermill kernel, a sweep's points) keep running.
Inside `sigterm_as_interrupt()` SIGTERM raises `Terminated`, a KeyboardInterrupt, so the
same code paths that handle Ctrl-C stop them.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """Raised by SIGTERM inside `sigterm_as_interrupt()`."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated. Does nothing off the main thread (signals
    only reach it) or where a Python handler for SIGTERM is already installed (an outer caller's)."""
    install = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None))
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if install else None
    try:
        yield
    finally:
        if install:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
