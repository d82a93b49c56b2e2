"""SIGTERM as an exception, so that an interrupted step cleans up after itself.

Slurm (``scancel``, a time limit) and Snakemake (on cancel) stop a job with SIGTERM, whose default
action ends the process at once: no ``finally`` runs, so every temporary file and staging folder
would stay behind. :func:`terminate_with_exception` (installed by the command line) turns SIGTERM
into :class:`Terminated`, raised in the main thread wherever it happens to be; the writers'
``finally`` blocks and context managers then remove their temporaries as they do for any error.

A few steps must not be cut in two: renaming a group of files that change together, or swapping a
staged folder for the old one. :func:`uninterrupted` holds a SIGTERM that arrives inside such a
section and raises it when the section is done.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Terminated", "terminate_with_exception", "uninterrupted"]


class Terminated(SystemExit):
    """The process was asked to stop (SIGTERM). A :class:`SystemExit`, so ``except Exception``
    blocks do not swallow it; its exit status is 128 + the signal number, as a shell reports it."""

    def __init__(self, signum: int):
        super().__init__(128 + int(signum))
        self.signum = int(signum)

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


class _State:
    depth = 0  # nesting of uninterrupted() sections in the main thread
    pending: int | None = None  # a signal held back by such a section
    raised = False  # Terminated was raised once: later signals must not cut its clean-up short


def _handler(signum, frame) -> None:
    if _State.raised:
        return
    if _State.depth > 0:
        _State.pending = signum
        return
    _State.raised = True
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_with_exception(signals=(signal.SIGTERM,)) -> Iterator[None]:
    """While the block runs, the signals ``signals`` raise :class:`Terminated` in the main thread
    (a signal that was set to be ignored, e.g. by ``nohup``, stays ignored); the previous handlers
    come back afterwards. Does nothing outside the main thread, where Python cannot set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for s in signals:
        if signal.getsignal(s) is not signal.SIG_IGN:
            previous[s] = signal.signal(s, _handler)
    _State.depth, _State.pending, _State.raised = 0, None, False
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold back :class:`Terminated` while the block runs; raise it at the end if a signal came.

    Only the main thread receives Python signal handlers, so only there is anything held back;
    in another thread the block simply runs.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _State.depth += 1
    try:
        yield
    finally:
        _State.depth -= 1
        if _State.depth == 0 and _State.pending is not None and not _State.raised:
            signum, _State.pending = _State.pending, None
            _State.raised = True
            raise Terminated(signum)
