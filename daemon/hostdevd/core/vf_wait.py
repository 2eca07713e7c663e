"""Waiting for a PF's new VFs after ``sriov_numvfs`` is written (R11).

The executor opens a :class:`VfWaiter`'s watch *before* the write, so no event is
missed, then waits on it. :class:`SysfsPollWaiter` polls sysfs and is what the
simulated kernel and tests use; :class:`hostdevd.adapters.udev.UdevWaiter` listens to
udev and is what the daemon uses on a real host
(:func:`hostdevd.adapters.udev.default_waiter` picks one).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Protocol

from .address import PciAddress
from .errors import SriovTimeout
from .sysfs import Sysfs


class VfWatch(Protocol):
    def wait(self, pf: PciAddress, count: int, timeout: float) -> list[str]:
        """Block until ``count`` VFs of ``pf`` exist (and udev announced them); return notes."""


class VfWaiter(Protocol):
    name: str

    def watch(self, pf: PciAddress) -> contextlib.AbstractContextManager[VfWatch]:
        """Start listening *before* sriov_numvfs is written."""


def vfs_present(sysfs: Sysfs, pf: PciAddress) -> list[PciAddress]:
    """The VFs of ``pf`` whose devices exist in sysfs now."""
    raw = sysfs.read_device(pf)
    return [v for v in raw.virtfns if sysfs.exists(v)]


class SysfsPollWaiter:
    """Polls sysfs for ``virtfnN`` links and the VF devices (the simulated kernel, tests, no udev)."""
    name = "sysfs"

    def __init__(self, sysfs: Sysfs, interval: float = 0.02):
        self.sysfs = sysfs
        self.interval = interval

    @contextlib.contextmanager
    def watch(self, pf: PciAddress) -> Iterator[SysfsPollWaiter]:
        yield self

    def wait(self, pf: PciAddress, count: int, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            if len(vfs_present(self.sysfs, pf)) >= count:
                return []
            if time.monotonic() >= deadline:
                raise SriovTimeout(f"{pf}: {len(vfs_present(self.sysfs, pf))} of {count} VFs appeared within "
                                   f"{timeout:g} s", "raise wait_timeout for this PF; check `dmesg`")
            time.sleep(self.interval)
