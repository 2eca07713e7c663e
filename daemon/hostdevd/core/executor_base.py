"""What every part of the executor shares: the host, the ledger and the step boundaries."""
from __future__ import annotations

import time
from collections.abc import Callable

from .address import PciAddress
from .ledger import DeviceRecord
from .ledger_store import LedgerStore
from .sysfs import Sysfs
from .telemetry import Telemetry


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class ExecutorBase:
    def __init__(self, sysfs: Sysfs, store: LedgerStore, on_step: Callable[[str], None] | None = None):
        self.sysfs = sysfs
        self.store = store
        # Called at every step boundary with a name ("claim:12", "bind:0000:01:00.0", ...);
        # tests use it to crash the executor at each boundary.
        self.on_step = on_step

    @property
    def telemetry(self) -> Telemetry:
        """The engine's (shared through the ledger store it gives the executor)."""
        return self.store.telemetry

    def _boundary(self, name: str) -> None:
        if self.on_step:
            self.on_step(name)

    def _set_state(self, group: int, addr: PciAddress, *, durable: bool = True, **changes: object) -> DeviceRecord:
        """One device record changed. ``durable=False``: an outcome the kernel already shows
        (LedgerStore._write says why its directory needs no fsync)."""
        with self.store.transaction(durable=durable) as ledger:
            claim = ledger.held(group)
            rec = claim.device(addr)
            assert rec is not None, f"{addr} is not in the claim of group {group}"
            for k, v in changes.items():
                setattr(rec, k, v)
            ledger.put(claim)
            return rec.model_copy()
