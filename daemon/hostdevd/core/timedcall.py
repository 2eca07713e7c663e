"""Run a blocking call with a timeout on reusable threads.

A sysfs write cannot be cancelled once the kernel has it (a driver's remove() may wait for its
users forever), so each write runs on a helper thread and the caller stops waiting after a
timeout. Starting a thread per write made a long-running daemon's RSS creep (a thread stack
and, often, a fresh malloc arena each time), so helpers are kept and reused. A helper stuck in
the kernel is never handed out again while it is stuck: other groups' writes go to other
helpers and never queue behind it. If its call returns later, the helper rejoins the pool.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class _Helper:
    def __init__(self, pool: TimedCaller, name: str):
        self._pool = pool
        self._jobs: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[[], None], timeout: float) -> bool:
        done = threading.Event()
        self._jobs.put((fn, done))
        return done.wait(timeout)

    def _loop(self) -> None:
        while True:
            fn, done = self._jobs.get()
            try:
                fn()
            except BaseException:
                log.exception("%s: unhandled error in a timed call", self.thread.name)
            finally:
                # back in the pool before the caller wakes, so its next call reuses this thread
                keep = self._pool._back(self)
                done.set()
            if not keep:
                return


class TimedCaller:
    """``call(fn, timeout)`` -> True if fn returned in time; fn must not raise (catch inside)."""

    def __init__(self, keep: int = 4, name: str = "timed-call"):
        self._idle: list[_Helper] = []
        self._lock = threading.Lock()
        self._keep = keep
        self._name = name
        self.started = 0          # helper threads started so far (tests, diagnostics)

    def call(self, fn: Callable[[], None], timeout: float) -> bool:
        with self._lock:
            if self._idle:
                helper = self._idle.pop()
            else:
                self.started += 1
                helper = _Helper(self, f"{self._name}-{self.started}")
        return helper.submit(fn, timeout)

    def _back(self, helper: _Helper) -> bool:
        """A helper finished its call: keep it for the next one, or let its thread end."""
        with self._lock:
            if len(self._idle) < self._keep:
                self._idle.append(helper)
                return True
        return False

    @property
    def idle(self) -> int:
        with self._lock:
            return len(self._idle)
