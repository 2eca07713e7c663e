"""Per-IOMMU-group locks: different groups proceed in parallel, one group is serialised."""
from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager


class GroupLocks:
    """Serialise work per IOMMU group; different groups proceed in parallel.

    Locks are always taken in ascending group order, so two requests that
    touch overlapping sets of groups cannot deadlock.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[int, threading.Lock] = {}

    @contextmanager
    def hold(self, groups: Iterable[int]) -> Iterator[None]:
        with ExitStack() as stack:
            for g in sorted(set(groups)):
                with self._guard:
                    lock = self._locks.setdefault(g, threading.Lock())
                stack.enter_context(lock)
            yield
